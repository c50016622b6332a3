"""The task registry: what each ``task.type`` is, in one table.

Code that behaves differently per task asks a question of the task's ``TaskKind`` (is it speech?
does it transcribe? is its head pretrained?) instead of comparing task names, so adding a task
means adding one entry here and its data pipeline, loss and score (raylin.data.tasks,
raylin.distill.losses), which dispatch on the same properties.

| task.type                | modality | targets      | model class (transformers)          | metric     |
|--------------------------|----------|--------------|-------------------------------------|------------|
| sequence_classification  | text     | class ids    | AutoModelForSequenceClassification  | accuracy   |
| causal_lm                | text     | next tokens  | AutoModelForCausalLM                | perplexity |
| utterance_classification | speech   | class ids    | AutoModelForAudioClassification     | accuracy   |
| ctc                      | speech   | transcripts  | AutoModelForCTC                     | wer, cer   |
"""

from __future__ import annotations

from dataclasses import dataclass

from raylin.registry import registry_entry


@dataclass(frozen=True)
class TaskKind:
    name: str
    modality: str  # "text" | "speech"
    targets: str  # "labels" (a class id per example) | "next_tokens" | "transcripts"
    model_class: str  # the transformers Auto class with this task's head
    metrics: tuple[str, ...]

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


TASK_KINDS: dict[str, TaskKind] = {
    kind.name: kind for kind in (
        TaskKind("sequence_classification", "text", "labels", "AutoModelForSequenceClassification", ("accuracy",)),
        TaskKind("causal_lm", "text", "next_tokens", "AutoModelForCausalLM", ("perplexity",)),
        TaskKind("utterance_classification", "speech", "labels", "AutoModelForAudioClassification", ("accuracy",)),
        TaskKind("ctc", "speech", "transcripts", "AutoModelForCTC", ("wer", "cer")),
    )
}
TASKS = tuple(TASK_KINDS)


def task_kind(name: str) -> TaskKind:
    """The registry entry of ``task.type`` ``name``; ValueError naming the choices for an unknown one."""
    return registry_entry(TASK_KINDS, name, "task.type")
