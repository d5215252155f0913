"""The champion as an MLflow Model: a ``mlflow.pyfunc`` wrapper around a cvae_core checkpoint.

``python -m analysis best`` logs it (the checkpoint directory as the model's artifact) and
registers it, so the usual MLflow tools work on ``models:/coupled-vae@champion``::

    model = mlflow.pyfunc.load_model("models:/coupled-vae@champion")
    model.predict(pd.DataFrame({"sentence": ["the market fell sharply"]}))        # per-sentence NLL
    model.predict(frame, params={"output": "reconstruction", "n_samples": 1})     # greedy decodes
    model.predict(frame, params={"output": "sample"})                             # prior samples

and ``mlflow models serve -m models:/coupled-vae@champion --env-manager local`` answers
``POST /invocations`` with ``{"dataframe_records": [{"sentence": "..."}], "params": {...}}``.

Input: a ``sentence`` column of whitespace-tokenised text (words outside the vocabulary count as
``<unk>``).  Output, one row per input row:

* ``output="nll"`` (default): ``nll`` in nats per sentence, importance-sampled with q(z|x) as the
  proposal and ``n_samples`` samples (100 = the paper's test setting), plus ``n_tokens`` (words
  + ``<eos>``); the same estimator as ``cvae evaluate``;
* ``output="reconstruction"``: ``text``, a greedy decode from z ~ q(z|x);
* ``output="sample"``: ``text``, a greedy decode from z ~ p(z) (the input only sets how many).
Every call is seeded (``seed``, default 0), so the same request gives the same answer.

The core loads inside ``load_context``/``predict``: MLflow imports this module to find the
class, and serving loads torch only once a model is loaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.models
import mlflow.pyfunc
import pandas as pd

OUTPUTS = ("nll", "reconstruction", "sample")
DEFAULT_PARAMS: dict[str, Any] = {"output": "nll", "n_samples": 100, "seed": 0}
BATCH_SIZE = 64


class CoupledVAEModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from cvae_core.checkpoint import load_model

        self.model, self.config, self.vocab = load_model(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from cvae_core.data.batching import make_batch
        from cvae_core.errors import CvaeError
        from cvae_core.generate import reconstruct, sample_prior
        from cvae_core.metrics.likelihood import importance_sampled_nll
        from cvae_core.runtime import seeded

        settings = {**DEFAULT_PARAMS, **{k: v for k, v in (params or {}).items() if v is not None}}
        output, n_samples, seed = str(settings["output"]), int(settings["n_samples"]), int(settings["seed"])
        if output not in OUTPUTS:
            raise CvaeError(f"params.output={output!r}: choose one of {', '.join(OUTPUTS)}")
        if n_samples < 1:
            raise CvaeError(f"params.n_samples={n_samples}: must be >= 1")
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame({"sentence": model_input})
        if "sentence" not in frame.columns:
            raise CvaeError(f"input needs a 'sentence' column; got {list(frame.columns)}")
        words = [str(text).split() for text in frame["sentence"]]
        if output == "sample":
            with seeded(seed):
                ids = sample_prior(self.model, len(words))
            return pd.DataFrame({"text": [" ".join(self.vocab.decode(x)) for x in ids]})
        if any(not w for w in words):
            raise CvaeError("an input sentence is empty")
        rows: list[dict[str, Any]] = []
        with seeded(seed):
            for start in range(0, len(words), BATCH_SIZE):
                chunk = [self.vocab.encode(w) for w in words[start:start + BATCH_SIZE]]
                batch = make_batch(chunk)
                if output == "nll":
                    nll = importance_sampled_nll(self.model, batch, n_samples)["nll"].tolist()
                    rows += [{"nll": value, "n_tokens": len(x) + 1} for value, x in zip(nll, chunk)]
                else:
                    decoded = reconstruct(self.model, batch, n_samples=1)
                    rows += [{"text": " ".join(self.vocab.decode(samples[0]))} for samples in decoded]
        return pd.DataFrame(rows)


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", "sentence")]),
                          params=ParamSchema([ParamSpec("output", "string", DEFAULT_PARAMS["output"]),
                                              ParamSpec("n_samples", "long", DEFAULT_PARAMS["n_samples"]),
                                              ParamSpec("seed", "long", DEFAULT_PARAMS["seed"])]))


def requirements() -> list[str]:
    """The project's pins of what the model imports (no slow inference by MLflow)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in ("torch", "numpy", "pandas", "mlflow")]


def log_champion(source_run_id: str, experiment_id: str, checkpoint: Path, tracking_uri: str) -> tuple[str, str]:
    """Log the checkpoint as a pyfunc model whose source is the trial run (which stays as it is).

    The model is logged from this file's code (MLflow's models-from-code), so loading it
    unpickles nothing. -> (the model's ``models:/m-...`` URI, its model id), to register."""
    import mlflow

    repo = Path(__file__).resolve().parents[1]
    mlflow.set_tracking_uri(tracking_uri)
    logged = mlflow.initialize_logged_model(name="model", source_run_id=source_run_id, experiment_id=experiment_id)
    info = mlflow.pyfunc.log_model(name="model", python_model=str(Path(__file__).resolve()), model_id=logged.model_id,
                                   artifacts={"checkpoint": str(checkpoint)}, signature=signature(),
                                   code_paths=[str(repo / "cvae_core")], pip_requirements=requirements())
    return info.model_uri, info.model_id


mlflow.models.set_model(CoupledVAEModel())
