"""Fine-tuning: faithful to the chapter, repeatable, and its outputs usable."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader, TensorDataset
from transformers import GPT2Model

from spam_gpt.cli import main
from spam_gpt.config import resolve_config
from spam_gpt.corpus import build_splits, bundled_corpus_bytes, parse_collection
from spam_gpt.finetune import finetune, write_outputs
from spam_gpt.predictor import Predictor
from spam_gpt.tokenizer import get_tokenizer
from spam_gpt.training import spam_scores

from .conftest import CHAPTER_HAM, CHAPTER_SPAM, free_port

SPLITS = build_splits()


class ReferenceClassifier(torch.nn.Module):
    """The chapter's classifier on transformers' GPT-2: the last position's hidden state
    through a new two-class head."""

    def __init__(self, folder):
        super().__init__()
        no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}  # as the chapter
        self.gpt = GPT2Model.from_pretrained(folder, **no_dropout)
        self.gpt.requires_grad_(False)
        torch.manual_seed(123)
        self.out_head = torch.nn.Linear(self.gpt.config.n_embd, 2)
        self.gpt.h[-1].requires_grad_(True)
        self.gpt.ln_f.requires_grad_(True)

    def forward(self, ids):
        return self.out_head(self.gpt(ids).last_hidden_state)


def reference_chapter_run(folder, epochs: int) -> dict:
    """Chapter 6's data loading, seeding and training loop, written plainly."""
    tokenizer = get_tokenizer()

    def padded(frame, length=None):
        encoded = [tokenizer.encode(text) for text in frame["Text"]]
        length = length or max(map(len, encoded))
        rows = [e[:length] + [50256] * (length - len(e[:length])) for e in encoded]
        return TensorDataset(torch.tensor(rows), torch.tensor(frame["Label"].tolist())), length

    torch.manual_seed(123)
    train, length = padded(SPLITS["train"])
    val, _ = padded(SPLITS["validation"], length)
    train_loader = DataLoader(train, batch_size=8, shuffle=True, drop_last=True)
    val_loader = DataLoader(val, batch_size=8)
    model = ReferenceClassifier(folder)

    def loss_of(x, y):
        return torch.nn.functional.cross_entropy(model(x)[:, -1, :], y)

    def mean_loss(loader, n):
        with torch.no_grad():
            return sum(loss_of(x, y).item() for _, (x, y) in zip(range(n), loader)) / n

    def accuracy(loader, n):
        right = seen = 0
        with torch.no_grad():
            for _, (x, y) in zip(range(n), loader):
                right += (model(x)[:, -1, :].argmax(-1) == y).sum().item()
                seen += len(y)
        return right / seen

    torch.manual_seed(123)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
    out = {"train_losses": [], "val_losses": [], "train_accs": [], "val_accs": []}
    step = -1
    for _ in range(epochs):
        model.train()
        for x, y in train_loader:
            optimizer.zero_grad()
            loss_of(x, y).backward()
            optimizer.step()
            step += 1
            if step % 50 == 0:
                model.eval()
                out["train_losses"].append(mean_loss(train_loader, 5))
                out["val_losses"].append(mean_loss(val_loader, 5))
                model.train()
        model.eval()
        out["train_accs"].append(accuracy(train_loader, 5))
        out["val_accs"].append(accuracy(val_loader, 5))
    return out


@pytest.fixture(scope="module")
def chapter_result(hf_gpt2_dir):
    cfg = resolve_config("chapter", {"weights": str(hf_gpt2_dir), "epochs": 2})
    return finetune(cfg, SPLITS, verbose=False)


def test_chapter_preset_trains_exactly_as_the_chapters_code(chapter_result, hf_gpt2_dir):
    reference = reference_chapter_run(hf_gpt2_dir, epochs=2)
    history = chapter_result.history
    assert len(history.train_losses) == 6  # steps 0, 50, ..., 250 of 260
    for key, expected in reference.items():
        assert getattr(history, key) == pytest.approx(expected, abs=1e-4), key
    assert history.examples_seen == 2 * 130 * 8


def test_chapter_preset_reads_the_pretrained_weights(chapter_result, hf_gpt2_dir):
    reference = GPT2Model.from_pretrained(hf_gpt2_dir)
    ours = chapter_result.classifier.gpt
    assert torch.equal(ours.tok_emb.weight, reference.wte.weight)  # frozen, so unchanged
    assert chapter_result.meta.train_config["weights_source"] == str(hf_gpt2_dir)
    assert chapter_result.meta.max_length == 120


def test_chapter_model_predicts_like_classify_review(chapter_result, tmp_path):
    """The chapter's ``classify_review`` pads each message to 120; so must the predictor."""
    write_outputs(chapter_result, tmp_path)
    predictor = Predictor.from_checkpoint(tmp_path / "model", max_tokens=3 * 128)
    texts = SPLITS["test"]["Text"].tolist()[:10]
    classifier = chapter_result.classifier.eval()
    for text, prediction in zip(texts, predictor.predict(texts)):
        ids = get_tokenizer().encode(text)[:120]
        ids = torch.tensor([ids + [50256] * (120 - len(ids))])
        with torch.no_grad():
            logits = classifier.gpt(ids)[:, -1, :]
        assert prediction.label == ("spam" if logits.argmax().item() == 1 else "not spam")
        assert prediction.spam_probability == pytest.approx(
            logits.softmax(-1)[0, 1].item(), abs=1e-5
        )


def test_fixed_seeds_give_identical_runs():
    cfg = resolve_config("tiny", {"epochs": 1})
    first, second = (finetune(cfg, SPLITS, verbose=False) for _ in range(2))
    assert first.history == second.history
    assert first.metrics["test_accuracy"] == second.metrics["test_accuracy"]


def test_keep_best_restores_the_best_epoch_and_patience_stops():
    # The plain table, so that every epoch's weights compare key by key with the kept ones,
    # and the dropout of the preset before spelled embeddings, whose seed peaks early.
    overrides = {"embeddings": "table", "drop_rate": 0.1}
    cfg = resolve_config("tiny", {"epochs": 6, "keep": "best", "patience": 2, **overrides})
    weights_after = []

    def remember(history, state) -> None:
        weights_after.append({k: v.clone() for k, v in state().model.items()})

    result = finetune(cfg, SPLITS, verbose=False, on_epoch_end=remember)
    history, metrics = result.history, result.metrics
    best = history.val_accs.index(max(history.val_accs)) + 1
    # This seed's validation accuracy falls after its best epoch, so keeping it matters.
    assert history.best_epoch == best == metrics["kept_epoch"] < history.epochs_done
    assert history.stopped_early and history.epochs_done == best + 2 == metrics["epochs_trained"]
    kept = result.classifier.state_dict()
    assert all(torch.equal(kept[k], weights_after[best - 1][k]) for k in kept)
    assert not all(torch.equal(kept[k], weights_after[-1][k]) for k in kept)
    # Epochs are judged on the whole validation set, as the final evaluation is.
    assert metrics["validation_accuracy"] == history.val_accs[best - 1]


def test_tiny_preset_reaches_95_percent(tiny_run):
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    print(
        f"tiny preset: {metrics['test_accuracy']:.4f} test accuracy, "
        f"{metrics['training_seconds']:.1f} s training"
    )
    assert metrics["test_accuracy"] >= 0.95  # 96.0 % at worst over twenty seeds
    for key in (
        "train_accuracy",
        "validation_accuracy",
        "spam_precision",
        "spam_recall",
        "spam_f1",
    ):
        assert 0.5 < metrics[key] <= 1.0
    history = metrics["history"]
    assert len(history["train_losses"]) == len(history["val_losses"]) == 13  # 650 steps
    assert len(history["train_accs"]) == 5 and history["examples_seen"] == 5200
    assert sum(map(sum, metrics["confusion_matrix"])) == 300
    assert metrics["training_seconds"] > 0


def test_outputs_are_plots_and_a_pickle_free_checkpoint(tiny_run):
    for stem in ("loss-plot", "accuracy-plot", "confusion-matrix"):
        assert (tiny_run / f"{stem}.pdf").read_bytes().startswith(b"%PDF")
        assert (tiny_run / f"{stem}.png").read_bytes().startswith(b"\x89PNG")
    meta = json.loads((tiny_run / "model" / "spam_gpt.json").read_text())
    assert meta["labels"] == ["not spam", "spam"] and meta["tokenizer"] == "gpt2"
    assert meta["token"] == "last_real" and meta["train_config"]["preset"] == "tiny"
    with safe_open(tiny_run / "model" / "model.safetensors", "pt") as weights:
        assert "gpt.out_head.weight" in set(weights.keys())


def test_classify_labels_the_chapters_examples(tiny_run, capsys):
    assert main(["classify", "--model", str(tiny_run / "model"), CHAPTER_SPAM, CHAPTER_HAM]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["spam", "not spam"]
    assert all(float(line.split("\t")[1]) > 0.5 for line in lines)  # each label's own
    assert main(["classify", "--json", "--model", str(tiny_run / "model"), CHAPTER_HAM]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["label"] == "not spam" and record["text"] == CHAPTER_HAM
    assert set(record["probabilities"]) == {"not spam", "spam"}
    assert sum(record["probabilities"].values()) == pytest.approx(1.0)
    assert record["probability"] == record["probabilities"]["not spam"] > 0.5
    assert record["spam_probability"] == record["probabilities"]["spam"]


@pytest.mark.parametrize(
    "ref", ["models:/spam-gpt/1", "models:/spam-gpt@champion", "runs:/abc/model"]
)
def test_a_model_from_a_store_that_is_not_there_names_the_store_and_creates_none(
    ref, tmp_path, capsys
):
    store = tmp_path / "mlflow.db"
    assert main(["classify", "--model", ref, "--tracking-uri", f"sqlite:///{store}", "hi"]) == 2
    assert f"no MLflow store at sqlite:///{store} (no such file)" in capsys.readouterr().err
    assert not store.exists()  # MLflow would have made an empty one


@pytest.mark.parametrize(
    "command",
    [
        ["classify", "--model", "models:/spam-gpt/1", "hi"],
        ["train", "--preset", "tiny", "--workers", "1"],
        ["sweep", "--preset", "tiny", "--grid", "book"],
    ],
    ids=["classify", "train-on-ray", "sweep"],
)
def test_a_tracking_server_that_does_not_answer_is_named_at_once(command, tmp_path, capsys):
    """MLflow's client would retry a refused connection for minutes, then print a traceback;
    nothing starts Ray first."""
    import ray

    uri = f"http://127.0.0.1:{free_port()}"
    output = [] if command[0] == "classify" else ["--output", str(tmp_path / "out")]
    assert main([*command, "--tracking-uri", uri, *output]) == 2
    assert f"no MLflow server answers at {uri} (" in capsys.readouterr().err
    assert not ray.is_initialized() and not (tmp_path / "out").exists()


def test_options_only_ray_train_uses_are_refused_in_process(tmp_path, capsys):
    args = ["train", "--preset", "tiny", "--output", str(tmp_path / "out")]
    assert main([*args, "--register-as", "mine", "--experiment", "x"]) == 2
    err = capsys.readouterr().err
    assert "--experiment, --register-as take effect on Ray Train" in err
    assert "add --workers 1" in err and not (tmp_path / "out").exists()


def test_classify_refuses_a_blank_message(tiny_run, capsys):
    model = str(tiny_run / "model")
    assert main(["classify", "--model", model, CHAPTER_HAM, " \t", ""]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "TEXT 2, 3 of 3 is blank" in captured.err


def test_classify_reads_one_message_per_line_from_standard_input(tiny_run, capsys, monkeypatch):
    model = str(tiny_run / "model")
    assert main(["classify", "--model", model, CHAPTER_SPAM, CHAPTER_HAM]) == 0
    from_arguments = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{CHAPTER_SPAM}\n{CHAPTER_HAM}\n"))
    assert main(["classify", "--model", model, "-"]) == 0
    assert capsys.readouterr().out == from_arguments and len(from_arguments.splitlines()) == 2
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{CHAPTER_HAM}\n\n{CHAPTER_SPAM}\n"))
    assert main(["classify", "--model", model, "-"]) == 2
    assert "line 2 of 3 is blank" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["classify", "--model", model, "-"]) == 2
    assert "standard input holds no messages" in capsys.readouterr().err


def test_ctrl_c_in_process_says_nothing_was_saved_and_where_checkpoints_are(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "spam_gpt.cli", "train", "--preset", "tiny"]
    job = subprocess.Popen(
        [*command, "--output", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    for line in job.stdout:  # Ctrl-C once training runs
        if line.startswith("Ep 1"):
            break
    os.killpg(job.pid, signal.SIGINT)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 130 and "Traceback" not in err, err
    assert "nothing was saved" in err and "--workers 1" in err
    assert not out.exists()


def test_a_reader_that_stops_early_gets_no_traceback(tiny_run):
    """`spam-gpt classify - < messages.txt | head -1`: head leaves after its line."""
    command = [sys.executable, "-m", "spam_gpt.cli", "classify", "--model", str(tiny_run / "model")]
    job = subprocess.Popen(
        [*command, "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    job.stdin.write(f"{CHAPTER_SPAM}\n".encode() * 20000)
    job.stdin.close()
    assert job.stdout.readline().startswith(b"spam\t")
    job.stdout.close()
    assert job.wait(timeout=120) == 128 + signal.SIGPIPE
    assert job.stderr.read() == b""


def test_bf16_precision_agrees_with_fp32(tiny_run):
    texts = SPLITS["test"]["Text"].tolist()
    exact = Predictor.from_checkpoint(tiny_run / "model").predict(texts)
    fast = Predictor.from_checkpoint(tiny_run / "model", precision="bf16").predict(texts)
    agree = sum(a.label == b.label for a, b in zip(exact, fast)) / len(texts)
    assert agree >= 0.99
    assert max(abs(a.spam_probability - b.spam_probability) for a, b in zip(exact, fast)) < 0.05


def test_int8_agrees_with_fp32_on_the_whole_corpus_without_a_warning(tiny_run):
    import warnings

    from torch.ao.nn.quantized.dynamic import Linear as TorchAOLinear

    from spam_gpt.precision import PerTokenInt8Linear, per_token_int8_runs_here

    texts = parse_collection(bundled_corpus_bytes())["Text"].tolist()
    exact = Predictor.from_checkpoint(tiny_run / "model").predict(texts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.ao's deprecation notices stay inside
        quantized = Predictor.from_checkpoint(tiny_run / "model", precision="int8")
        fast = quantized.predict(texts)
    blocks = quantized.classifier.gpt.trf_blocks
    expected = PerTokenInt8Linear if per_token_int8_runs_here() else TorchAOLinear
    assert isinstance(blocks[0].ff.layers[0], expected)
    assert isinstance(blocks[0].att.W_query, expected)
    assert type(quantized.classifier.gpt.out_head) is torch.nn.Linear  # the head stays fp32
    assert blocks[0].ff.layers[1].approximate == "none"  # erf GELU: 4.6x the tanh kernel
    agree = sum(a.label == b.label for a, b in zip(exact, fast)) / len(texts)
    assert agree >= 0.99
    gaps = sorted(abs(a.spam_probability - b.spam_probability) for a, b in zip(exact, fast))
    assert gaps[int(0.99 * len(gaps))] < 0.02 and gaps[-1] < 0.05  # measured: 0.001, 0.006


def test_int8_without_vnni_is_torch_aos_dynamic_quantisation(tiny_run):
    """The path for CPUs without VNNI, which this machine would not otherwise take."""
    import warnings

    from torch.ao.nn.quantized.dynamic import Linear as TorchAOLinear

    from spam_gpt.precision import torch_ao_int8

    texts = SPLITS["test"]["Text"].tolist()
    exact = Predictor.from_checkpoint(tiny_run / "model")
    quantized = Predictor.from_checkpoint(tiny_run / "model")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its deprecation notices stay inside
        quantized.classifier = torch_ao_int8(quantized.classifier)
    blocks = quantized.classifier.gpt.trf_blocks
    assert isinstance(blocks[0].ff.layers[2], TorchAOLinear)
    assert type(quantized.classifier.gpt.out_head) is torch.nn.Linear
    same = [a.label == b.label for a, b in zip(exact.predict(texts), quantized.predict(texts))]
    assert sum(same) / len(texts) >= 0.99


def relative_error(layer: torch.nn.Module, exact: torch.nn.Linear, x: torch.Tensor) -> float:
    with torch.inference_mode():
        want = exact(x)
        return ((layer(x) - want).norm() / want.norm()).item()


def test_per_token_int8_rounds_each_token_on_its_own_scale():
    import warnings

    from spam_gpt.precision import PerTokenInt8Linear

    torch.manual_seed(0)
    layer = torch.nn.Linear(768, 768)
    torch.nn.init.normal_(layer.weight, std=0.02)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        per_pass = torch.ao.quantization.quantize_dynamic(
            torch.nn.Sequential(layer),
            {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig},
            torch.qint8,
        )[0]
    # Tokens of different ranges, as a pass of many messages holds: one scale for all
    # rounds the small ones coarsely (their steps 10x too large here), each its own does not.
    x = torch.randn(4, 128, 768) * torch.linspace(0.2, 2.0, 128)[:, None]
    per_token = PerTokenInt8Linear(layer)
    assert per_token(x).shape == (4, 128, 768)
    with torch.inference_mode():
        want, token, tensor = (f(x)[:, :8] for f in (layer, per_token, per_pass))  # smallest
    small_token, small_pass = (((y - want).norm() / want.norm()).item() for y in (token, tensor))
    assert small_token < 0.02 and small_token < 0.25 * small_pass
    # A single token, and a token of zeros (its scale floored, not divided by zero).
    assert relative_error(per_token, layer, x[:1, :1]) < 0.02
    zeros = torch.zeros(1, 2, 768)
    assert torch.allclose(per_token(zeros), layer.bias.detach().expand(1, 2, 768))


def test_per_token_int8_centres_what_a_gelu_hands_on():
    from spam_gpt.precision import PerTokenInt8Linear

    torch.manual_seed(0)
    layer = torch.nn.Linear(3072, 768)
    x = torch.nn.functional.gelu(torch.randn(256, 3072) * 1.5)  # from -0.17 up
    centred, around_zero = PerTokenInt8Linear(layer, centred=True), PerTokenInt8Linear(layer)
    with torch.no_grad():  # the weights as rounded: what is left is the activations' rounding
        layer.weight.copy_(centred.rounded_weight())
    assert relative_error(centred, layer, x) < 0.6 * relative_error(around_zero, layer, x)


def test_int8_is_refused_on_a_gpu_with_the_alternative(tiny_run):
    with pytest.raises(ValueError, match="int8 runs on CPUs; on a GPU use bf16"):
        Predictor.from_checkpoint(tiny_run / "model", precision="int8", device="cuda")


def test_evaluate_prints_accuracies_and_spam_scores(tiny_run, capsys):
    assert main(["evaluate", "--model", str(tiny_run / "model")]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert f"Test accuracy: {metrics['test_accuracy'] * 100:.2f}%" in out
    assert f"Validation accuracy: {metrics['validation_accuracy'] * 100:.2f}%" in out
    assert "Training accuracy:" in out and "Spam precision" in out and "recall" in out


def test_the_summary_names_the_epoch_keep_best_kept(tiny_run, capsys):
    from spam_gpt.cli import print_summary

    metrics = json.loads((tiny_run / "metrics.json").read_text())  # as Ray jobs return them
    print_summary({**metrics, "kept_epoch": 2, "epochs_trained": 5})
    kept = "Kept the weights of epoch 2 of 5, the best on validation (--keep best)\n"
    assert capsys.readouterr().out.startswith(kept)
    print_summary({**metrics, "kept_epoch": 5, "epochs_trained": 5})
    assert "Kept" not in capsys.readouterr().out


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "log-file"])
def test_train_prints_chapter_lines_progress_and_honours_overrides(
    terminal, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--epochs", "1", "--lr", "0.002", "--output", str(out)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "Ep 1 (Step 000000): Train loss" in captured.out
    assert "Training accuracy:" in captured.out and "Validation accuracy:" in captured.out
    assert ("Epoch 1/1" in captured.err) == terminal  # the step bar, never into a log file
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert config["epochs"] == 1 and config["lr"] == 0.002 and config["model"] == "tiny"


def test_bad_settings_get_a_clear_error(tmp_path, capsys):
    assert main(["train", "--preset", "tiny", "--token", "middle", "--output", str(tmp_path)]) == 2
    assert "token must be one of last, last_real, first" in capsys.readouterr().err
    assert main(["classify", "--model", str(tmp_path), "hello"]) == 2
    assert "not a spam-gpt checkpoint" in capsys.readouterr().err


def test_presets():
    fast = resolve_config("fast")
    assert (fast.padding, fast.token, fast.weights) == ("batch", "last_real", "gpt2-small")
    chapter = resolve_config("chapter")
    assert (chapter.lr, chapter.weight_decay, chapter.epochs, chapter.batch_size) == (
        5e-5,
        0.1,
        5,
        8,
    )
    assert resolve_config("tiny", {"lr": None}).lr == resolve_config("tiny").lr


def test_spam_scores():
    confusion = torch.tensor([[140.0, 10.0], [5.0, 145.0]])
    scores = spam_scores(confusion)
    assert scores["spam_precision"] == pytest.approx(145 / 155)
    assert scores["spam_recall"] == pytest.approx(145 / 150)
    p, r = 145 / 155, 145 / 150
    assert scores["spam_f1"] == pytest.approx(2 * p * r / (p + r))
