"""The task registry: what each ``task.type`` is, in one table.

Code that behaves differently per task asks a question of the task's ``TaskKind`` (is it speech?
does it transcribe? is its head pretrained?) instead of comparing task names, so adding a task
means adding one entry here and its data pipeline, loss and score (raylin.data.task_data, raylin.scoring,
raylin.distill.losses), which dispatch on the same properties. The entry also holds the task's data
sets (with the evaluation sets each is scored on by default), its built-in evaluation sets, its
broad-data default and its metrics; ``METRICS`` holds each metric's direction.

| task.type                | modality | targets      | model class (transformers)          | metric     |
|--------------------------|----------|--------------|-------------------------------------|------------|
| sequence_classification  | text     | class ids    | AutoModelForSequenceClassification  | accuracy   |
| causal_lm                | text     | next tokens  | AutoModelForCausalLM                | perplexity |
| utterance_classification | speech   | class ids    | AutoModelForAudioClassification     | accuracy   |
| ctc                      | speech   | transcripts  | AutoModelForCTC                     | wer, cer   |
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raylin.registry import registry_entry


@dataclass(frozen=True)
class Metric:
    """A score and its direction (Tune's ``mode``, retention's ratio, "better" in reports)."""

    name: str
    higher_is_better: bool

    @property
    def mode(self) -> str:
        return "max" if self.higher_is_better else "min"


METRICS: dict[str, Metric] = {metric.name: metric for metric in (
    Metric("accuracy", higher_is_better=True),
    Metric("perplexity", higher_is_better=False),
    Metric("wer", higher_is_better=False),
    Metric("cer", higher_is_better=False),
    Metric("loss", higher_is_better=False),
    Metric("retention", higher_is_better=True),
)}


def metric(name: str) -> Metric:
    """The metric a (possibly prefixed) name reports: ``eval_accuracy``, ``fortunes.perplexity`` and
    ``accuracy`` all name accuracy; ValueError naming the known metrics for any other name."""
    for separator in (".", "_"):
        for start in range(len(name)):
            if start == 0 or name[start - 1] == separator:
                if name[start:] in METRICS:
                    return METRICS[name[start:]]
    raise ValueError(f"metric {name!r} is unknown; raylin scores {tuple(METRICS)} (optionally prefixed, e.g. eval_accuracy).")


@dataclass(frozen=True)
class TaskKind:
    name: str
    modality: str  # "text" | "speech"
    targets: str  # "labels" (a class id per example) | "next_tokens" | "transcripts" | "none" (unlabeled)
    model_class: str  # the transformers Auto class with this task's head
    metrics: tuple[str, ...]  # names in METRICS; the first is the task's score
    # data.name -> the built-in evaluation sets scored by default besides its held-out split
    datasets: dict[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    eval_sets: tuple[str, ...] = ()  # built-in evaluation sets (raylin.data.eval_sets) a run may name
    broad_data: str | None = None  # broad.data auto: the built-in broad set (raylin.data.broad), or none

    @property
    def metric(self) -> Metric:
        """The task's score."""
        return METRICS[self.metrics[0]]

    @property
    def speech(self) -> bool:
        return self.modality == "speech"

    @property
    def classifies(self) -> bool:
        """One class id per example (the logits are per example)."""
        return self.targets == "labels"

    @property
    def language_model(self) -> bool:
        """Next-token prediction: the head comes pretrained with the model, so an untuned teacher
        can be scored and can guide as the target teacher."""
        return self.targets == "next_tokens"

    @property
    def transcribes(self) -> bool:
        """CTC: per-frame logits over characters, scored by word and character error rates."""
        return self.targets == "transcripts"


_TEXT_SETS = ("imdb", "rotten_tomatoes")
_SPEECH_SETS = ("flite", "festival")
_SPEECH_DATA = {"spoken_digits": _SPEECH_SETS, "hub_audio": ()}
TASK_KINDS: dict[str, TaskKind] = {
    kind.name: kind for kind in (
        TaskKind("sequence_classification", "text", "labels", "AutoModelForSequenceClassification", ("accuracy",),
                 datasets={"rotten_tomatoes": ("imdb",), "imdb": ("rotten_tomatoes",), "sst2": _TEXT_SETS,
                           "qnli": (), "qqp": ()},
                 eval_sets=_TEXT_SETS, broad_data="passages"),
        TaskKind("causal_lm", "text", "next_tokens", "AutoModelForCausalLM", ("perplexity",),
                 datasets={"austen": ("fortunes",), "pile": ("fortunes",), "corpus": ("fortunes",)},
                 eval_sets=("fortunes",)),
        TaskKind("utterance_classification", "speech", "labels", "AutoModelForAudioClassification", ("accuracy",),
                 datasets=_SPEECH_DATA, eval_sets=_SPEECH_SETS, broad_data="voices"),
        TaskKind("ctc", "speech", "transcripts", "AutoModelForCTC", ("wer", "cer"),
                 datasets=_SPEECH_DATA, eval_sets=_SPEECH_SETS, broad_data="voices"),
    )
}
TASKS = tuple(TASK_KINDS)
# Not a task.type: what an unlabeled audio source (the broad-data stage's) is read as, clips only.
UNLABELED_AUDIO = TaskKind("unlabeled_audio", "speech", "none", "", ())


def task_kind(name: str) -> TaskKind:
    """The registry entry of ``task.type`` ``name``; ValueError naming the choices for an unknown one."""
    return registry_entry(TASK_KINDS, name, "task.type")
