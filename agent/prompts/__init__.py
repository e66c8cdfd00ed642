"""Prompts: the agent asks a person, remembers the answers, and decides which clusters hold crystals.

This room owns everything between the agent and its operator:

- `wire`: the protocol's messages (`Prompt`, `PromptOption`, `PromptInfo`, `PromptClosed`, `Answer`,
  `AnswerReply`, the request envelope); `errors`: its typed errors; `images`: checking and saving a
  prompt's PNG images; `endpoints`: loopback and CURVE rules for the sockets.
- `channel`: the agent's end (`OperatorChannel`, `PromptHandle`), with `book` (the prompts' states) and
  `requests` (reading client requests); `client`: a front-end's end (`OperatorClient`).
- `memory`: label memory (`LabelMemory`), with `label_records` (what is stored), `label_log` (the
  append-only file) and `label_votes` (the vote rule; tuning figures in `docs/label-memory.md`).
- `policy`: the labelling decision (`decide_crystal_clusters`: label memory, then the operator, then
  the plan's fallback).
- `simulated`: `PolicyOperator`, a client that answers prompts with an answer policy (e.g.
  `simulator.operator.SimulatedAnswerPolicy`, wired by the command that starts it).

Imports go one way: `agent.prompts` uses `drivers` (auth, image files) and `agent.config`; nothing here
imports the screening session, the steps or `simulator`.
"""

from __future__ import annotations

from agent.prompts.channel import OperatorChannel, PromptHandle
from agent.prompts.client import OperatorClient, OperatorEvent
from agent.prompts.errors import (
    AnswerRefusedError,
    BadRequestError,
    InvalidAnswerError,
    OperatorError,
    OperatorProtocolError,
    OperatorSecurityError,
    OperatorTimeoutError,
    PromptAlreadyAnsweredError,
    PromptClosedError,
    PromptExpiredError,
    PromptNotFoundError,
)
from agent.prompts.images import MAX_IMAGE_BYTES, save_prompt_images
from agent.prompts.label_log import LABELS_ENV_VAR, LABELS_FILE_NAME, default_labels_dir
from agent.prompts.label_records import LabelMemoryError, LabelRecord, LabelSource, LabelSuggestion
from agent.prompts.label_votes import DEFAULT_CONFIDENCE_THRESHOLD
from agent.prompts.memory import LabelMemory
from agent.prompts.policy import LabellingDecision, decide_crystal_clusters
from agent.prompts.simulated import AnswerAttempt, PolicyOperator
from agent.prompts.wire import (
    DEFAULT_PROMPT_TIMEOUT_S,
    PROTOCOL_VERSION,
    Answer,
    AnswerReply,
    Prompt,
    PromptClosed,
    PromptInfo,
    PromptOption,
)

__all__ = [
    "DEFAULT_CONFIDENCE_THRESHOLD",
    "DEFAULT_PROMPT_TIMEOUT_S",
    "LABELS_ENV_VAR",
    "LABELS_FILE_NAME",
    "MAX_IMAGE_BYTES",
    "PROTOCOL_VERSION",
    "Answer",
    "AnswerAttempt",
    "AnswerRefusedError",
    "AnswerReply",
    "BadRequestError",
    "InvalidAnswerError",
    "LabelMemory",
    "LabelMemoryError",
    "LabelRecord",
    "LabelSource",
    "LabelSuggestion",
    "LabellingDecision",
    "OperatorChannel",
    "OperatorClient",
    "OperatorError",
    "OperatorEvent",
    "OperatorProtocolError",
    "OperatorSecurityError",
    "OperatorTimeoutError",
    "PolicyOperator",
    "Prompt",
    "PromptAlreadyAnsweredError",
    "PromptClosed",
    "PromptClosedError",
    "PromptExpiredError",
    "PromptHandle",
    "PromptInfo",
    "PromptNotFoundError",
    "PromptOption",
    "decide_crystal_clusters",
    "default_labels_dir",
    "save_prompt_images",
]
