"""The MLflow pyfunc model, logged as "model from code": MLflow records this file rather
than pickling an object, so loading the model runs this code and unpickles nothing.

Input: a DataFrame with a ``text`` column. Output: ``label``, its ``probability``, every
label's probability in ``probabilities`` (a mapping), and for a spam/not-spam model the
``spam_probability`` it always had.
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel


def bad_input(message: str) -> MlflowException:
    """An error MLflow's scoring server (``mlflow models serve``) answers as a 400 saying
    ``message``; any other exception reaches its clients as "an unexpected error"."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class SpamGptModel(PythonModel):
    def load_context(self, context) -> None:
        from spam_gpt.predictor import Predictor

        self.predictor = Predictor.from_checkpoint(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if "text" not in model_input.columns:
            raise bad_input(
                f"input needs a 'text' column; it has {', '.join(map(str, model_input.columns))}"
            )
        texts = model_input["text"]
        bad = [i for i, text in enumerate(texts) if not isinstance(text, str) or not text.strip()]
        if bad:
            raise bad_input(f"rows {bad[:10]} have no text to classify (null or blank)")
        from spam_gpt.classifier import is_spam_model

        predictions = self.predictor.predict(list(texts))
        frame = pd.DataFrame(
            {
                "label": [p.label for p in predictions],
                "probability": [p.probability for p in predictions],
                "probabilities": [p.probabilities for p in predictions],
            }
        )
        if is_spam_model(self.predictor.meta.labels):
            frame["spam_probability"] = [p.spam_probability for p in predictions]
        return frame


mlflow.models.set_model(SpamGptModel())
