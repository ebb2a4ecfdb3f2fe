"""Synthesis of stage-1 (SCP) training data, the library half: prompts, parsing, verification, engines.

The Ray job (:mod:`pipelines.synth`) is a thin shell over this module. For every chunk it asks an
engine for

- ``qa``: simple question-answer pairs that together cover every fact of the chunk;
- ``multihop``: questions that need two related chunks (paired by :func:`pair_chunks`: shared
  entities, else shared rare words);
- ``paraphrase``: rewrites of the chunk that keep every fact.

Each engine output goes through :func:`process_generation`: :func:`extract_json` (JSON inside prose
or a code fence, truncated JSON, trailing commas), the items are coerced (missing fields become
rejects), and each item is verified lexically against its chunk(s) (:func:`verify_qa`,
:func:`verify_paraphrase`). The driver keeps a :class:`TaskState` per task: it removes duplicates,
measures which facts the accepted questions cover, and builds the next round's task (a new seed and
the list of still uncovered sentences) until the task is satisfied or the rounds run out.

Engines share one interface (:class:`SynthEngine`): a batch of :class:`GenerationRequest` in, one
:class:`Generation` each out. :class:`TransformersEngine` runs any causal LM in-process;
:class:`ClozeEngine` is rule-based (a named entity, number or date masked in the chunk's own
sentences) for machines without a usable LLM, and writes its questions in the same JSON an LLM is
asked for, so the same parser and verifier apply. The vLLM engine lives in the Ray job, behind
``ray.data.llm``, producing the same generation columns.

Work is grouped into :class:`WorkUnit` s whose key is derived from their content and the settings; a
unit's output is one file written atomically (:func:`write_unit_file`), so a rerun after a crash
skips finished units and every chunk's records appear exactly once.

This module never imports ``ray``.

Layout: ``text`` (tokens, sentences, entity and answer spans), ``tasks`` (tasks, requests,
generations, the engine interface), ``prompts``, ``parse`` (model output -> items), ``verify``
(lexical checks, coverage, duplicates), ``rounds`` (one generation -> accepted items and rejects;
a task's state across rounds), ``units`` (records, multi-hop pairs, content-keyed work units) and
``engines`` (cloze, transformers).
The names below are re-exported here, the package's public interface.
"""

from clara.synth.engines import ClozeEngine, TransformersEngine
from clara.synth.parse import coerce_paraphrases, coerce_qa_items, extract_json, repair_truncated_json
from clara.synth.prompts import (
    SYSTEM_PROMPT,
    answer_first_prompt,
    answer_first_target,
    json_schema,
    qa_counts,
    question_fits_answer,
    render_prompt,
    roundtrip_prompt,
    task_messages,
)
from clara.synth.rounds import (
    Outcome,
    RoundSettings,
    TaskState,
    judge_tasks,
    process_generation,
    request_for,
    roundtrip_verdict,
)
from clara.synth.tasks import (
    CHECK_KINDS,
    JUDGE_KIND,
    PROMPT_VERSION,
    QA_STYLES,
    ROUNDTRIP_KIND,
    TASK_KINDS,
    Generation,
    GenerationRequest,
    SynthEngine,
    Task,
)
from clara.synth.text import (
    chunk_entities,
    content_tokens,
    entity_spans,
    fact_sentences,
    split_sentences,
    stems,
    word_tokens,
)
from clara.synth.units import (
    UnitChunk,
    WorkUnit,
    chunk_records,
    multihop_records,
    pair_chunks,
    plan_units,
    read_unit_file,
    unit_path,
    validate_record,
    write_unit_file,
)
from clara.synth.verify import (
    DEFAULT_VERIFY,
    VerifySettings,
    coverage,
    is_duplicate_paraphrase,
    is_duplicate_qa,
    question_key,
    sentence_covered,
    verify_paraphrase,
    verify_qa,
)

__all__ = [
    "CHECK_KINDS",
    "ClozeEngine",
    "DEFAULT_VERIFY",
    "Generation",
    "GenerationRequest",
    "JUDGE_KIND",
    "Outcome",
    "PROMPT_VERSION",
    "QA_STYLES",
    "ROUNDTRIP_KIND",
    "RoundSettings",
    "SYSTEM_PROMPT",
    "SynthEngine",
    "TASK_KINDS",
    "Task",
    "TaskState",
    "TransformersEngine",
    "UnitChunk",
    "VerifySettings",
    "WorkUnit",
    "answer_first_prompt",
    "answer_first_target",
    "chunk_entities",
    "chunk_records",
    "coerce_paraphrases",
    "coerce_qa_items",
    "content_tokens",
    "coverage",
    "entity_spans",
    "extract_json",
    "fact_sentences",
    "is_duplicate_paraphrase",
    "is_duplicate_qa",
    "json_schema",
    "judge_tasks",
    "multihop_records",
    "pair_chunks",
    "plan_units",
    "process_generation",
    "qa_counts",
    "question_fits_answer",
    "question_key",
    "read_unit_file",
    "render_prompt",
    "repair_truncated_json",
    "request_for",
    "roundtrip_prompt",
    "roundtrip_verdict",
    "sentence_covered",
    "split_sentences",
    "stems",
    "task_messages",
    "unit_path",
    "validate_record",
    "verify_paraphrase",
    "verify_qa",
    "word_tokens",
    "write_unit_file",
]
