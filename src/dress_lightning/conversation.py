"""Conversation rendering and label masking: chat templates, condition segments, assistant-only labels.

A conversation (``[{"role", "content"}, ...]``, first user turn holding one ``<image>``) is rendered
to text by a template, tokenized once with character offsets, and labelled: a token carries a
label only if it lies entirely inside an assistant response (plus the template's end-of-turn
marker, so the model learns to stop). A token that straddles a response boundary means the
template and the tokenizer disagree about where the response is; the sample is refused with
:class:`ConversationFormatError` rather than trained on with a shifted mask (a known LLaVA failure).

Each assistant turn may carry a *condition* (the feedback text ``C(f)`` of conditional RL, see
``docs/design.md`` s.4). It is rendered before the response it describes and never trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from transformers import PreTrainedTokenizerBase

from dress_lightning.conditions import ConditionPlacement
from dress_lightning.special_tokens import IMAGE_TOKEN

FORMAT_VERSION = "dress-conversation-v3"
"""Version of the rendering rules below (templates, condition placement, masking); recorded in provenance.

v2: under ``vicuna_v1`` a conditioned response keeps its leading space (v1 dropped it after the condition's
newline, so conditioned responses were other tokens than plain ones).
v3: the ``user_prefix`` placement (the condition opens the user turn); the v2 placements render as before.
"""

IGNORE_INDEX = -100
"""Label of tokens that carry no loss (Hugging Face / PyTorch cross-entropy convention)."""

TemplateName = Literal["vicuna_v1", "chat_template"]

VICUNA_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class ConversationFormatError(ValueError):
    """A conversation cannot be rendered and masked safely; the message says why."""


class PromptTooLongError(ConversationFormatError):
    """A generation prompt does not fit ``max_length``."""


@dataclass(frozen=True)
class Rendered:
    """Template output: the text and the character spans that carry loss, one per assistant turn."""

    text: str
    spans: list[tuple[int, int]]


@dataclass(frozen=True)
class EncodedConversation:
    """Token ids and labels (``IGNORE_INDEX`` outside selected responses) of one conversation."""

    input_ids: list[int]
    labels: list[int]
    num_truncated: int
    """Trailing tokens cut to fit ``max_length`` (never image tokens)."""


@dataclass(frozen=True)
class _Message:
    role: str
    content: str
    condition: str | None = None


class ChatTemplate(Protocol):
    """Renders messages; ``spans`` mark each assistant response (+ end-of-turn marker)."""

    def render(self, messages: Sequence[_Message], add_generation_prompt: bool) -> Rendered: ...

    def condition_prefix(self, condition: str) -> str:
        """Text between the assistant-turn header and a response conditioned on ``condition``."""
        ...

    def stop_strings(self) -> list[str]: ...


class VicunaV1Template:
    """LLaVA's ``conv_vicuna_v1``: ``SYSTEM USER: q ASSISTANT: a</s>USER: ...``."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, system_prompt: str | None) -> None:
        self.eos = tokenizer.eos_token
        self.system_prompt = VICUNA_SYSTEM_PROMPT if system_prompt is None else system_prompt

    def render(self, messages: Sequence[_Message], add_generation_prompt: bool) -> Rendered:
        text, spans = self.system_prompt + " ", []
        for message in messages:
            if message.role == "user":
                text += f"USER: {message.content} "
                continue
            text += "ASSISTANT:"
            if message.condition is not None:
                text += self.condition_prefix(message.condition)
            # The response span starts with its leading space, conditioned or not: byte-level BPE glues the
            # space to the first word (" The" is one token, "The" after a newline another), so a response is
            # the same tokens with and without a condition, and what SFT taught about them carries over.
            response = " " + message.content
            start = len(text)
            text += response + self.eos
            spans.append((start, len(text)))
        if add_generation_prompt:
            text += "ASSISTANT:"
        return Rendered(text, spans)

    def condition_prefix(self, condition: str) -> str:
        return f" {condition}\n"

    def stop_strings(self) -> list[str]:
        return [self.eos]


class HFChatTemplate:
    """The tokenizer's own chat template (``tokenizer.apply_chat_template``)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, system_prompt: str | None) -> None:
        if not tokenizer.chat_template:
            raise ConversationFormatError(
                f"template='chat_template' but tokenizer {tokenizer.name_or_path!r} has no chat template; "
                "use template='vicuna_v1' or a tokenizer that ships one."
            )
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.end_of_turn = self._probe_end_of_turn()

    def _apply(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        if self.system_prompt is not None:
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _probe_end_of_turn(self) -> str:
        # What the template writes right after an assistant message (e.g. "<|im_end|>", "<|eot_id|>"):
        # it is trained on so the model learns to stop, and generation stops on it.
        marker = "\x00RESPONSE\x00"
        text = self._apply([{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}], False)
        return text[text.index(marker) + len(marker) :].strip()

    def render(self, messages: Sequence[_Message], add_generation_prompt: bool) -> Rendered:
        prefixes = [self.condition_prefix(m.condition) if m.condition is not None else "" for m in messages]
        contents = [prefix + m.content for m, prefix in zip(messages, prefixes)]
        text = self._apply([{"role": m.role, "content": c} for m, c in zip(messages, contents)], add_generation_prompt)
        spans, cursor = [], 0
        for message, content, prefix in zip(messages, contents, prefixes):
            start = text.find(content, cursor)
            if start < 0:
                raise ConversationFormatError(
                    f"The chat template of {self.tokenizer.name_or_path!r} rewrites {message.role} content, so the "
                    "response cannot be located for label masking; use template='vicuna_v1'."
                )
            cursor = start + len(content)
            if message.role == "assistant":
                start += len(prefix)
                end = cursor + len(self.end_of_turn) if text.startswith(self.end_of_turn, cursor) else cursor
                spans.append((start, end))
        return Rendered(text, spans)

    def condition_prefix(self, condition: str) -> str:
        return f"{condition}\n"

    def stop_strings(self) -> list[str]:
        return [s for s in (self.end_of_turn, self.tokenizer.eos_token) if s]


TEMPLATES: dict[str, type] = {"vicuna_v1": VicunaV1Template, "chat_template": HFChatTemplate}


class ConversationFormatter:
    """Turns schema conversations into model inputs: ``input_ids`` and assistant-only ``labels``."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        num_image_tokens: int,
        template: TemplateName = "vicuna_v1",
        max_length: int = 1024,
        system_prompt: str | None = None,
        condition_placement: ConditionPlacement = "assistant_prefix",
    ) -> None:
        if template not in TEMPLATES:
            raise ValueError(f"Unknown template {template!r}; valid templates: {', '.join(TEMPLATES)}.")
        if max_length <= num_image_tokens:
            raise ValueError(f"max_length={max_length} cannot hold the image ({num_image_tokens} tokens).")
        if not tokenizer.is_fast:
            raise ValueError("A fast tokenizer is required (character offsets drive the label mask).")
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.condition_placement = condition_placement
        self.template: ChatTemplate = TEMPLATES[template](tokenizer, system_prompt)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    @property
    def stop_token_ids(self) -> list[int]:
        """Token ids that end an assistant turn (pass as ``eos_token_id`` to generation)."""
        ids = [self.tokenizer.convert_tokens_to_ids(s) for s in self.template.stop_strings()]
        return sorted({i for i in ids if i is not None and i != self.tokenizer.unk_token_id})

    def _messages(
        self, conversation: Sequence[dict], conditions: Sequence[str | None] | None
    ) -> list[_Message]:
        if not conversation or conversation[0]["role"] != "user":
            raise ConversationFormatError("A conversation must start with a user turn.")
        num_assistant = sum(turn["role"] == "assistant" for turn in conversation)
        conditions = list(conditions) if conditions is not None else [None] * num_assistant
        if len(conditions) != num_assistant:
            raise ConversationFormatError(
                f"{len(conditions)} condition(s) given for {num_assistant} assistant turn(s)."
            )
        image = IMAGE_TOKEN * self.num_image_tokens
        messages, assistant_index = [], 0
        for turn in conversation:
            content = turn["content"].replace(IMAGE_TOKEN, image)
            condition = None
            if turn["role"] == "assistant":
                condition = conditions[assistant_index]
                assistant_index += 1
                if condition is not None and self.condition_placement == "user_suffix":
                    # The condition joins the user turn before the response it describes.
                    messages[-1] = _Message("user", f"{messages[-1].content}\n{condition}")
                    condition = None
                elif condition is not None and self.condition_placement == "user_prefix":
                    # The condition opens the user turn (before its image and question), so the question
                    # meets the response right after it, as in SFT: the answer copies words from the question.
                    messages[-1] = _Message("user", f"{condition}\n{messages[-1].content}")
                    condition = None
            messages.append(_Message(turn["role"], content, condition))
        return messages

    def _tokenize(self, rendered: Rendered) -> tuple[list[int], list[tuple[int, int]]]:
        encoding = self.tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = encoding["input_ids"]
        if input_ids.count(self.image_token_id) != self.num_image_tokens:
            raise ConversationFormatError(
                f"Expected exactly one {IMAGE_TOKEN} in the first user turn ({self.num_image_tokens} tokens after "
                f"expansion), found {input_ids.count(self.image_token_id)} image tokens."
            )
        return input_ids, encoding["offset_mapping"]

    def encode(
        self,
        conversation: Sequence[dict],
        conditions: Sequence[str | None] | None = None,
        train_turns: Sequence[bool] | None = None,
    ) -> EncodedConversation:
        """Tokenize a full conversation; labels cover the responses of the selected assistant turns.

        ``conditions`` holds one condition text (or None) per assistant turn; ``train_turns`` selects
        which assistant turns carry loss (default: all). The tokens end with the last trained response.
        """
        rendered = self.template.render(self._messages(conversation, conditions), add_generation_prompt=False)
        selected = list(train_turns) if train_turns is not None else [True] * len(rendered.spans)
        if len(selected) != len(rendered.spans):
            raise ConversationFormatError(f"train_turns has {len(selected)} entries for {len(rendered.spans)} turns.")
        input_ids, offsets = self._tokenize(rendered)
        labels = [IGNORE_INDEX] * len(input_ids)
        for turn, ((start, end), train) in enumerate(zip(rendered.spans, selected)):
            inside = []
            for index, (token_start, token_end) in enumerate(offsets):
                if token_end <= start or token_start >= end:
                    continue
                if token_start < start or token_end > end:
                    raise ConversationFormatError(
                        f"Token {self.tokenizer.convert_ids_to_tokens(input_ids[index])!r} straddles the boundary "
                        f"of assistant turn {turn} ({rendered.text[start:end]!r}): the template and the tokenizer "
                        "disagree on where the response starts or ends, so the label mask would be wrong."
                    )
                inside.append(index)
            if not inside:
                raise ConversationFormatError(f"Assistant turn {turn} is empty after tokenization.")
            if train:
                for index in inside:
                    labels[index] = input_ids[index]
        encoded = self._truncate(input_ids, labels)
        # Tokens after the last trained one cannot change the loss (attention is causal): a conversation whose
        # later turns carry none (a refinement that did not improve) ends there. 17% of CRL's tokens on ShapeWorld.
        trained = [index for index, label in enumerate(encoded.labels) if label != IGNORE_INDEX]
        if trained:
            end = trained[-1] + 1
            encoded = EncodedConversation(encoded.input_ids[:end], encoded.labels[:end], encoded.num_truncated)
        return encoded

    def _truncate(self, input_ids: list[int], labels: list[int]) -> EncodedConversation:
        overflow = len(input_ids) - self.max_length
        if overflow <= 0:
            return EncodedConversation(input_ids, labels, num_truncated=0)
        last_image = len(input_ids) - 1 - input_ids[::-1].index(self.image_token_id)
        if last_image >= self.max_length:
            raise ConversationFormatError(
                f"max_length={self.max_length} would cut image tokens (the image ends at token {last_image + 1}); "
                "raise max_length or shorten the text before the image."
            )
        labels = labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise ConversationFormatError(
                f"No response token is left within max_length={self.max_length} ({overflow} tokens over)."
            )
        return EncodedConversation(input_ids[: self.max_length], labels, num_truncated=overflow)

    def encode_prompt(self, conversation: Sequence[dict], condition: str | None = None) -> list[int]:
        """Token ids of a generation prompt: the conversation (ending with a user turn) + the assistant prefix.

        ``condition`` is the feedback text the next response should be conditioned on. In a multi-turn
        chat every earlier assistant turn carries it too (the model keeps the target condition every
        turn; docs/design.md s.4).
        """
        if not conversation or conversation[-1]["role"] != "user":
            raise ConversationFormatError("A generation prompt must end with a user turn.")
        turns = sum(turn["role"] == "assistant" for turn in conversation) + 1
        messages = self._messages([*conversation, {"role": "assistant", "content": ""}], [condition] * turns)
        pending = messages.pop()
        text = self.template.render(messages, add_generation_prompt=True).text
        if pending.condition is not None:
            text += self.template.condition_prefix(pending.condition)
        input_ids, _ = self._tokenize(Rendered(text, []))
        if len(input_ids) > self.max_length:
            raise PromptTooLongError(f"Prompt of {len(input_ids)} tokens exceeds max_length={self.max_length}.")
        return input_ids
