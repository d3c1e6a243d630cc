"""spam-gpt: chapter 6 of "Build a Large Language Model (From Scratch)" as a service.

The ML core (corpus, tokenizer, model, weights, classifier, training, checkpoint,
predictor, plots) imports no Ray; ``distributed``, ``scoring`` and ``serving`` wire it to
Ray Train, Ray Data and Ray Serve, ``tracking`` to MLflow; ``cli`` and ``jobs/`` only parse
arguments and call.
"""

__version__ = "0.1.0"
