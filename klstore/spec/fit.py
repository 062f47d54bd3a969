"""Lens fits (`klstore lens fit CONFIG`): the corpus, the recipes of the tuned and Jacobian
lenses, and `FitSpec`, whose `identity` is hashed into the fit's id."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from klstore.errors import KlstoreError
from klstore.spec.experiment import ModelConfig
from klstore.spec.messages import Value, fail, rule, validate
from klstore.spec.values import DEFAULT_STORE, LayerSpec, check_label


class CorpusSpec(Value):
    """The text a lens is fitted on (klstore.core.corpus): a text file (one document), a folder
    of them, a JSON Lines file with a `text` field, or a Hugging Face dataset name (`name` or
    `name:config`), packed into sequences of `seq_len` tokens; the last `held_out` sequences are
    the evaluation split, and the training split is the first `train_sequences` of the others
    (all when absent)."""

    path: str
    seq_len: int = Field(128, ge=2, le=1_000_000)
    held_out: int = Field(16, ge=1)
    train_sequences: int | None = Field(None, ge=1)
    text_field: str = "text"
    split: str = "train"  # of a Hugging Face dataset
    max_documents: int | None = Field(None, ge=1)


class TunedRecipe(Value):
    """How the tuned lens is trained: tuned-lens 0.2.0's defaults (its `train` command), but for
    the token budget, which is required (tuned-lens's 250 x 2**18 ~ 65M tokens is weeks on a CPU).
    SGD with Nesterov momentum at lr_scale x (1 - momentum) (0.1), coupled weight decay, gradients
    clipped to norm `max_grad_norm`, linear warm-up then linear decay to 0 at the last step."""

    tokens: int = Field(ge=1)  # training tokens seen in all (steps = tokens / tokens_per_step)
    tokens_per_step: int = Field(2**18, ge=1)
    lr_scale: float = Field(1.0, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(1e-3, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0)
    seed: int = 0  # the order of the training sequences

    @property
    def lr(self) -> float:
        """The SGD learning rate at the end of warm-up (tuned-lens: lr_scale x (1 - momentum))."""
        return self.lr_scale * (1 - self.momentum) if self.momentum else self.lr_scale


class JacobianRecipe(Value):
    """The Jacobian lens's estimator (klstore.core.jacobian): the reference's options."""

    skip: int = Field(16, ge=0)  # leading positions excluded from the valid positions V
    dim_batch: int = Field(8, ge=1)  # output dimensions per backward pass
    max_len: int | None = Field(None, ge=2)  # cut each prompt to this many tokens
    shard_size: int = Field(4, ge=1)  # prompts per checkpointed shard in the store
    # the blocks to fit, as a layer spec (`20-26`, `-8--2`); None: every block but the last (the
    # reference's default). The last block's J is the identity and is never fitted.
    source_layers: LayerSpec | None = None

    def identity(self) -> dict:
        """The recipe's part of a fit's id; source_layers only when given, so the ids of fits
        made before the option existed stay the same."""
        return self.model_dump(exclude=None if self.source_layers is not None else {"source_layers"})


FIT_KINDS = ("tuned", "least_squares", "jacobian")


class FitSpec(Value):
    """A lens fit (`klstore lens fit CONFIG`): one model, one corpus, one lens kind."""

    name: str = "lens-fit"
    store: str = DEFAULT_STORE
    model: ModelConfig
    kind: Literal["tuned", "least_squares", "jacobian"]
    init: Literal["identity", "least_squares"] = "least_squares"  # tuned: where training starts
    corpus: CorpusSpec
    train: TunedRecipe | None = None  # required for kind tuned
    jacobian: JacobianRecipe = Field(default_factory=JacobianRecipe)  # kind jacobian
    workers: int = Field(1, ge=1)  # Ray Train workers (one model copy each)
    batch_size: int = Field(4, ge=1)  # sequences per forward pass on a worker
    checkpoint_every: int = Field(10, ge=1)  # training steps between checkpoints in the store

    @field_validator("name")
    @classmethod
    def _name(cls, value):
        return rule(check_label, value, "fit name")

    @model_validator(mode="before")
    @classmethod
    def _model(cls, data):
        if isinstance(data, dict) and isinstance(data.get("model"), str):
            data = {**data, "model": {"name": data["model"]}}
        return data

    @model_validator(mode="after")
    def _recipe(self):
        if self.kind == "tuned" and self.train is None:
            raise fail("train: a tuned lens needs a training recipe with at least `tokens:`")
        if self.kind == "jacobian":
            length = min(self.corpus.seq_len, self.jacobian.max_len or self.corpus.seq_len)
            if length <= self.jacobian.skip + 1:
                raise fail(
                    f"jacobian: prompts of {length} tokens have no valid position with skip "
                    f"{self.jacobian.skip} (every prompt is too short: they need at least {self.jacobian.skip + 2})"
                )
        return self

    def identity(self) -> dict:
        """What defines the fit (hashed into its id, which names its checkpoints in the store)."""
        return {
            "name": self.name,
            "model": {"name": self.model.name, "dtype": self.model.dtype},
            "kind": self.kind,
            "init": self.init if self.kind == "tuned" else None,
            "corpus": self.corpus.model_dump(),
            "train": self.train.model_dump() if self.train and self.kind == "tuned" else None,
            "workers": self.workers,
            "batch_size": self.batch_size,
            **({"jacobian": self.jacobian.identity()} if self.kind == "jacobian" else {}),
        }


def parse_fit(data, source: str = "config") -> FitSpec:
    """Validate a lens-fit config mapping (errors name the file and key)."""
    if not isinstance(data, dict):
        raise KlstoreError(f"{source}: config must be a mapping")
    return validate(FitSpec, data, source)
