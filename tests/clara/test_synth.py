"""clara.synth without Ray: parsing model output, lexical verification, rounds, cloze, pairing, units."""

from __future__ import annotations

import json

import pytest

from clara.data.records import parse_record
from clara.synth import (
    ClozeEngine,
    Generation,
    GenerationRequest,
    RoundSettings,
    Task,
    TaskState,
    UnitChunk,
    answer_first_prompt,
    answer_first_target,
    chunk_entities,
    chunk_records,
    coerce_paraphrases,
    coerce_qa_items,
    coverage,
    entity_spans,
    extract_json,
    json_schema,
    multihop_records,
    pair_chunks,
    plan_units,
    process_generation,
    question_fits_answer,
    read_unit_file,
    render_prompt,
    repair_truncated_json,
    request_for,
    split_sentences,
    task_messages,
    unit_path,
    validate_record,
    verify_paraphrase,
    verify_qa,
    write_unit_file,
)

CHUNK = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower. "
    "Construction began in January 1887 and was completed on 31 March 1889. "
    "The tower is 330 metres tall and was the tallest man-made structure in the world for 41 years."
)
OTHER = (
    "Gustave Eiffel was a French civil engineer born in Dijon in 1832. "
    "Before the tower, his company built the internal frame of the Statue of Liberty in New York."
)


def _qa_task(chunk=CHUNK, cid="doc::0") -> Task:
    return Task("qa", (cid,), (chunk,), "u", 0, 8)


# ---------------------------------------------------------------------------------------------
# parsing


def test_well_formed_json():
    value, how = extract_json('{"qa": [{"question": "Who designed it?", "answer": "Gustave Eiffel"}]}', ("qa",))
    assert how == "json" and value["qa"][0]["answer"] == "Gustave Eiffel"


def test_json_inside_prose_and_code_fence():
    text = (
        "Sure! Here are the question-answer pairs you asked for:\n\n```json\n"
        '{"qa": [{"question": "When was the Eiffel Tower completed?", "answer": "31 March 1889"},\n'
        '        {"question": "How tall is the Eiffel Tower?", "answer": "330 metres"}]}\n```\n'
        "Let me know if you need more {questions}."
    )
    value, how = extract_json(text, ("qa",))
    assert how == "embedded"
    assert [p["answer"] for p in value["qa"]] == ["31 March 1889", "330 metres"]
    # prose on both sides, no fence, and a decoy object first
    value, how = extract_json('Format: {"x": 1}. Answer: {"qa": [{"question": "Q?", "answer": "A"}]} Done.', ("qa",))
    assert how == "embedded" and value == {"qa": [{"question": "Q?", "answer": "A"}]}


def test_reasoning_block_is_dropped():
    text = '<think>The passage says {"qa": [] maybe...</think>\n{"paraphrases": ["A rewrite."]}'
    assert extract_json(text, ("paraphrases",)) == ({"paraphrases": ["A rewrite."]}, "json")


def test_truncated_json_keeps_complete_items_and_reports_the_cut_one():
    text = ('{"qa": [{"question": "Who designed the tower?", "answer": "Gustave Eiffel"}, '
            '{"question": "When did construction begin?", "answer": "January 18')
    value, how = extract_json(text, ("qa",))
    assert how == "repaired"
    assert value == {"qa": [{"question": "Who designed the tower?", "answer": "Gustave Eiffel"},
                            {"question": "When did construction begin?"}]}
    items, rejects = coerce_qa_items(value)
    assert items == [{"question": "Who designed the tower?", "answer": "Gustave Eiffel"}]
    assert [r["reason"] for r in rejects] == ["missing_answer"]


def test_truncated_inside_a_new_item_drops_it():
    text = '{"qa": [{"question": "Who?", "answer": "Eiffel"}, {"quest'
    assert repair_truncated_json(text) == '{"qa": [{"question": "Who?", "answer": "Eiffel"}]}'
    assert repair_truncated_json('{"qa": [') == '{"qa": []}'
    assert repair_truncated_json('{"a": 1, "b": tr') == '{"a": 1}'
    assert repair_truncated_json('{"a": [1, 2], "b": {"c": "d"}}') == '{"a": [1, 2], "b": {"c": "d"}}'
    assert repair_truncated_json("no bracket") is None


def test_trailing_commas_and_control_characters():
    value, how = extract_json('{"qa": [{"question": "Who?", "answer": "Eiffel",},]}', ("qa",))
    assert how == "repaired" and value == {"qa": [{"question": "Who?", "answer": "Eiffel"}]}
    value, _ = extract_json('{"qa": [{"question": "Wh\x04o?", "answer": "A"}]}', ("qa",))
    assert value["qa"][0]["question"] == "Wh\x04o?"


def test_no_json_and_empty_output():
    assert extract_json("I cannot help with that.", ("qa",)) == (None, "no_json")
    assert extract_json("   ", ("qa",)) == (None, "empty_output")
    assert extract_json("{{{ ]]", ("qa",)) == (None, "unparseable_json")


def test_missing_fields_and_variants():
    value = {"questions": [
        {"question": "Who designed the tower?", "answer": "Gustave Eiffel"},
        {"question": "How tall is it?"},
        {"answer": "1889"},
        {"q": "Where is the tower?", "a": "Paris"},
        ["What is it made of?", "wrought iron"],
        "Q: When was it completed? A: 31 March 1889",
        {"question": "How many years was it the tallest?", "answer": 41},
        42,
    ]}
    items, rejects = coerce_qa_items(value)
    assert [i["answer"] for i in items] == ["Gustave Eiffel", "Paris", "wrought iron", "31 March 1889", "41"]
    assert sorted(r["reason"] for r in rejects) == ["malformed_item", "missing_answer", "missing_question"]
    assert coerce_qa_items({"answer_list": []})[1][0]["reason"] == "no_items"
    assert coerce_qa_items({"question": "Who?", "answer": "X"})[0] == [{"question": "Who?", "answer": "X"}]


def test_paraphrase_variants():
    assert coerce_paraphrases({"paraphrases": ["one", "two"]}) == (["one", "two"], [])
    assert coerce_paraphrases({"paraphrase": "just one"}) == (["just one"], [])
    assert coerce_paraphrases(["a", {"text": "b"}, 3])[0] == ["a", "b"]


# ---------------------------------------------------------------------------------------------
# verification


@pytest.mark.parametrize("question,answer", [
    ("Who designed and built the Eiffel Tower?", "Gustave Eiffel's company"),
    ("When was the Eiffel Tower completed?", "31 March 1889"),
    ("How tall is the Eiffel Tower?", "330 metres"),
    ("In which city is the Champ de Mars?", "Paris"),
    ("What material is the Eiffel Tower's lattice made of?", "wrought iron"),
    ("For how many years was the Eiffel Tower the world's tallest man-made structure?", "41"),
    ("When did construction of the Eiffel Tower start?", "January 1887"),
    ("Is the Eiffel Tower in Paris?", "Yes"),
])
def test_verify_keeps_supported_answers(question, answer):
    assert verify_qa(question, answer, [CHUNK]) is None


@pytest.mark.parametrize("question,answer,reason", [
    ("When was the Eiffel Tower completed?", "31 March 1899", "answer_not_in_chunk"),  # wrong year
    ("How tall is the Eiffel Tower?", "300 metres", "answer_not_in_chunk"),
    ("Who designed the Eiffel Tower?", "Alexandre Dumas", "answer_not_in_chunk"),
    ("Who is the Eiffel Tower named after?", "the Eiffel Tower", "answer_in_question"),
    ("Eiffel Tower height", "330 metres", "not_a_question"),
    ("What is the capital of Japan?", "Tokyo", "question_off_topic"),
    ("When was the tower completed?", "", "empty_answer"),
    ("", "Paris", "empty_question"),
    ("Where is the Eiffel Tower?", "it is on the Champ de Mars in Paris, France, and it was named after the "
     "engineer Gustave Eiffel whose company designed and built it over two years", "answer_too_long"),
    ("What is the Eiffel Tower?", "the", "answer_uninformative"),
])
def test_verify_rejects_unsupported_answers(question, answer, reason):
    assert verify_qa(question, answer, [CHUNK]) == reason


def test_verify_splits_hyphens_and_dashes():
    chunk = "Anderson played for the United States under-15 team. On 12–13 October 1997 the group toured Turkey."
    assert verify_qa("For which under-age team did Anderson play?", "under-15", [chunk]) is None
    assert verify_qa("When did the group tour Turkey?", "13 October 1997", [chunk]) is None


def test_verify_multihop_needs_both_passages():
    ok = verify_qa("In which city was the engineer who gave his name to the Eiffel Tower born?", "Dijon",
                   [CHUNK, OTHER], multihop=True)
    assert ok is None
    one_sided = verify_qa("How tall is the Eiffel Tower on the Champ de Mars?", "330 metres", [CHUNK, OTHER],
                          multihop=True)
    assert one_sided == "not_multi_hop"


def test_verify_paraphrase():
    good = ("Standing on the Champ de Mars in Paris, France, the Eiffel Tower is a lattice tower of wrought iron. "
            "Its name comes from Gustave Eiffel, the engineer whose company designed and built it. Work on it "
            "started in January 1887 and ended on 31 March 1889. At 330 metres, it remained the tallest structure "
            "made by people anywhere for 41 years.")
    assert verify_paraphrase(good, CHUNK) is None
    assert verify_paraphrase(CHUNK, CHUNK) == "near_copy"
    assert verify_paraphrase(good.replace("41 years", "forty years"), CHUNK) == "missing_number"
    assert verify_paraphrase(good + " It had 7 million visitors in 2015.", CHUNK) == "novel_number"
    assert verify_paraphrase("A tower in Paris built 1887 to 1889, 330 metres, 31, 41.", CHUNK) == "too_short"
    assert verify_paraphrase("", CHUNK) == "empty_paraphrase"
    unrelated = ("A famous and very old structure stands in a large European capital city, and many people who "
                 "travel there in January 1887 or on 31 March 1889 like to see it from far away, because it is 330 "
                 "metres high and was for 41 years the highest thing around, which is quite remarkable indeed.")
    assert verify_paraphrase(unrelated, CHUNK) == "facts_missing"


# ---------------------------------------------------------------------------------------------
# one generation, several rounds


def test_process_generation_on_realistic_output():
    text = ('Here are the pairs:\n{"qa": [\n'
            '  {"question": "Who is the Eiffel Tower named after?", "answer": "Gustave Eiffel"},\n'
            '  {"question": "When was the Eiffel Tower completed?", "answer": "31 March 1889"},\n'
            '  {"question": "How tall is the Eiffel Tower?", "answer": "324 metres"},\n'
            '  {"question": "Where is the Eiffel Tower?"}\n]}')
    out = process_generation(_qa_task(), Generation(text, 80, 300))
    assert [i["answer"] for i in out.items] == ["Gustave Eiffel", "31 March 1889"]
    assert sorted(r["reason"] for r in out.rejects) == ["answer_not_in_chunk", "missing_answer"]
    assert out.parsed == "embedded" and out.num_generated_tokens == 80


def test_process_generation_failures_are_rejects():
    assert process_generation(_qa_task(), Generation("", error="prompt too long")).rejects[0]["reason"] \
        == "engine_error"
    garbage = process_generation(_qa_task(), Generation("lattice lattice ??? ~~~"))
    assert garbage.rejects[0]["reason"] == "no_json" and "lattice" in garbage.rejects[0]["raw"]
    cut = process_generation(_qa_task(), Generation('{"qa": [{"question": "When was the tower'))
    assert [r["reason"] for r in cut.rejects] == ["truncated_output"]
    declined = process_generation(Task("multihop", ("a", "b"), (CHUNK, OTHER), n_items=1), Generation('{"qa": []}'))
    assert declined.declined and not declined.rejects
    plain = process_generation(Task("paraphrase", ("a",), (CHUNK,)), Generation(CHUNK))
    assert plain.parsed == "plain_text" and plain.rejects[0]["reason"] == "near_copy"


def test_rounds_regenerate_what_is_missing_and_drop_duplicates():
    s = RoundSettings(max_rounds=3, min_coverage=1.0, min_qa=2)
    st = TaskState(_qa_task())
    first = process_generation(st.task, Generation(json.dumps({"qa": [
        {"question": "Who is the Eiffel Tower named after?", "answer": "Gustave Eiffel"},
        {"question": "Who is the Eiffel tower named after?", "answer": "Gustave Eiffel"},  # duplicate
        {"question": "When was the Eiffel Tower completed?", "answer": "31 March 1889"}]})))
    st.absorb(first)
    assert len(st.items) == 2 and [r["reason"] for r in st.rejects] == ["duplicate"]
    assert st.needs_round(s)
    nxt = st.next_task(s)
    assert nxt.round == 1 and len(nxt.known) == 2
    assert any("330 metres" in f for f in nxt.focus) and any("Champ de Mars" in f for f in nxt.focus)
    prompt = task_messages(nxt)[1]["content"]
    assert "do not repeat" in prompt and "330 metres" in prompt
    st.absorb(process_generation(nxt, Generation(json.dumps({"qa": [
        {"question": "How tall is the Eiffel Tower?", "answer": "330 metres"},
        {"question": "On which field in Paris does the Eiffel Tower stand?", "answer": "the Champ de Mars"}]}))))
    assert coverage(CHUNK, st.items)[0] == 1.0
    assert st.satisfied(s) and not st.needs_round(s)


def test_rounds_stop_at_max_rounds():
    s = RoundSettings(max_rounds=2)
    st = TaskState(_qa_task())
    for _ in range(2):
        st.absorb(process_generation(st.task, Generation("nothing useful")))
    assert not st.satisfied(s) and not st.needs_round(s)


def test_answer_first_asks_for_the_question_of_a_span_of_the_chunk():
    t = Task("qa", ("doc::0",), (CHUNK,), "u", 0, 8, style="answer_first")
    sentence, answer = answer_first_target(t)
    assert sentence in CHUNK and answer in sentence and (answer[0].isupper() or answer[0].isdigit())
    prompt = answer_first_prompt(t)
    assert prompt.endswith(f"Text: {sentence}\nAnswer: {answer}\nQuestion:") and prompt.count("Question:") == 5
    # later rounds move to other spans; a round whose focus lists an uncovered sentence asks about it
    assert answer_first_target(Task("qa", t.chunk_ids, t.chunks, "u", 1, style="answer_first")) != (sentence, answer)
    tall = "The tower is 330 metres tall and was the tallest man-made structure in the world for 41 years."
    focused = Task("qa", t.chunk_ids, t.chunks, "u", 1, focus=(tall,), style="answer_first")
    assert answer_first_target(focused)[0] == tall
    assert answer_first_target(Task("qa", ("x",), ("ok then so it goes on and on.",), style="answer_first")) is None


def test_answer_first_replies_are_verified_as_qa():
    tall = "The tower is 330 metres tall and was the tallest man-made structure in the world for 41 years."
    t = Task("qa", ("doc::0",), (CHUNK,), "u", 1, focus=(tall,), style="answer_first")
    _, answer = answer_first_target(t)
    good = process_generation(t, Generation(" How tall is the Eiffel Tower?\nText: more"))
    assert good.items == [{"question": "How tall is the Eiffel Tower?", "answer": answer}] and not good.rejects
    statement = process_generation(t, Generation(" The Eiffel Tower is in Paris."))
    assert statement.rejects[0]["reason"] == "not_a_question" and not statement.items
    # a date asked for by a question that is not about time is the typical mismatch of a small writer
    dated = Task("qa", ("doc::0",), (CHUNK,), "u", 0, focus=("Construction began in January 1887 and was "
                                                              "completed on 31 March 1889.",), style="answer_first")
    _, date = answer_first_target(dated)
    assert date in ("January 1887", "31 March 1889")
    wrong = process_generation(dated, Generation("What did the construction of the Eiffel Tower involve?"))
    assert wrong.rejects[0]["reason"] == "question_does_not_fit_answer"
    fits = [
        ("How tall is the tower?", "330 metres", True),
        ("Which country is the capital of India?", "21,778", False),
        ("How many years was it the tallest structure?", "41", True),
        ("Who designed the tower?", "Gustave Eiffel", True),
        # a title's capitalised word is not what the question asks for; a person or a place is never a year
        ("Who wrote The Gilded Age?", "1894", False),
        ("Where was the treaty signed in the year of the war?", "1648", False),
        ("Where was the treaty of the Thirty Years War signed?", "1648", False),
        ("In which year was The Gilded Age published?", "1873", True),
        ("What age did she reach?", "94", True),
        # a "who" / "where" that opens a clause is not what the question asks for
        ("In what year was the scientist who discovered penicillin born?", "1881", True),
        ("How many people lived in the town where it was signed?", "12,000", True),
        ("To whom was the prize given in 1901?", "1901", False),
        ("Q: When did Émile Zola die?", "1902", True),
    ]
    assert [question_fits_answer(q, a) for q, a, _ in fits] == [ok for _, _, ok in fits]
    right = process_generation(dated, Generation("When did construction of the Eiffel Tower begin?"))
    assert right.items and right.items[0]["answer"] == date
    # the style survives the round trip through the job's rows and the next round
    assert Task.from_json(dated.to_json()) == dated
    st = TaskState(dated)
    st.absorb(right)
    assert st.next_task(RoundSettings(max_rounds=3)).style == "answer_first"
    with pytest.raises(ValueError, match="style"):
        Task("qa", ("a",), ("b",), style="free")


def test_requests_differ_by_round_and_carry_a_schema():
    t0 = _qa_task()
    r0 = request_for(t0, "p", max_tokens=64, temperature=0.0, top_p=1.0, seed=0, structured=True)
    r1 = request_for(Task("qa", t0.chunk_ids, t0.chunks, "u", 1), "p", max_tokens=64, temperature=0.0, top_p=1.0,
                     seed=0, structured=False)
    assert r0.temperature == 0.0 and r1.temperature > 0 and r0.seed != r1.seed
    assert json.loads(r0.json_schema) == json_schema("qa", 15) and r1.json_schema is None


def test_prompts_ask_for_json_with_rules():
    for task in (_qa_task(), Task("multihop", ("a", "b"), (CHUNK, OTHER), n_items=2),
                 Task("paraphrase", ("a",), (CHUNK,), n_items=2)):
        system, user = task_messages(task)
        assert system["role"] == "system" and "JSON" in system["content"]
        assert "Rules:" in user["content"] and CHUNK.strip() in user["content"]
        assert "Reply with JSON of exactly this form" in user["content"]
    assert "Passage B" in task_messages(Task("multihop", ("a", "b"), (CHUNK, OTHER)))[1]["content"]


def test_render_prompt_uses_the_chat_template_when_there_is_one():
    msgs = task_messages(_qa_task())
    plain = render_prompt(msgs, None)
    assert plain.startswith("### System\n") and plain.endswith("### Assistant\n")

    class Tok:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            if messages[0]["role"] == "system":
                raise ValueError("System role not supported")
            return "<user>" + messages[0]["content"] + "</user><assistant>"

    folded = render_prompt(msgs, Tok())
    assert folded.startswith("<user>" + msgs[0]["content"]) and CHUNK.strip() in folded


# ---------------------------------------------------------------------------------------------
# cloze, records, pairing, units


def test_sentences_and_entities():
    text = "Dr. J. R. R. Tolkien lived in Oxford. He wrote The Hobbit in 1937! Was it popular? Yes.\nNew line here"
    assert split_sentences(text) == ["Dr. J. R. R. Tolkien lived in Oxford.", "He wrote The Hobbit in 1937!",
                                     "Was it popular?", "Yes.", "New line here"]
    s = "In 1887 the Bank of England lent money to Gustave Eiffel in Paris."
    assert [s[a:b] for a, b in entity_spans(s)] == ["Bank of England", "Gustave Eiffel", "Paris"]
    assert {"gustave eiffel", "champ de mars", "paris", "eiffel tower"} <= chunk_entities(CHUNK)


def test_cloze_engine_masks_facts_of_the_chunk():
    engine = ClozeEngine(max_items=10)
    qs = engine.questions(CHUNK)
    answers = [q["answer"] for q in qs]
    assert "31 March 1889" in answers and "330 metres" in answers or "330" in answers
    assert "Champ de Mars" in answers or "Paris" in answers
    for q in qs:
        assert "_____" in q["question"] and q["answer"] in CHUNK
        assert q["answer"] not in q["question"]
        assert verify_qa(q["question"], q["answer"], [CHUNK]) is None
    req = GenerationRequest(_qa_task(), "")
    out = process_generation(req.task, engine.generate([req])[0])
    assert len(out.items) == len(qs) and not out.rejects
    assert engine.generate([req]) == engine.generate([req])  # deterministic
    para = engine.generate([GenerationRequest(Task("paraphrase", ("a",), (CHUNK,)), "")])[0]
    assert para.error and not para.text


def test_records_validate():
    recs = chunk_records("doc::0", CHUNK, [{"question": "How tall is it?", "answer": "330 metres"}],
                         [{"text": "A rewrite."}], "test")
    assert [r["data_type"] for r in recs] == ["qa", "paraphrase"]
    for r in recs:
        assert validate_record(r, "scp", "t") is None
        assert parse_record(r, "scp")
    assert chunk_records("doc::0", CHUNK, [], [], "test") == []
    mh = multihop_records(("a", "b"), (CHUNK, OTHER), [{"question": "Q?", "answer": "Dijon", "bridge": "Eiffel"}], "t")
    assert validate_record(mh[0], "instruct", "t") is None and parse_record(mh[0], "instruct")[0].gold == (0, 1)
    assert "exactly one chunk" in validate_record({**recs[0], "docs": [CHUNK, OTHER]}, "scp", "t")


def test_pair_chunks_by_shared_entities():
    chunks = [("a", CHUNK), ("b", "Bananas are yellow fruits that grow in tropical places."), ("c", OTHER),
              ("d", "Bananas grow on large herbaceous plants in tropical regions of Asia.")]
    pairs = pair_chunks(chunks)
    assert ("a", "c") in pairs and ("b", "d") in pairs
    assert not any((y, x) in pairs for x, y in pairs) and all(x != y for x, y in pairs)
    assert pair_chunks(chunks) == pairs
    assert pair_chunks(chunks[:1]) == [] and pair_chunks(chunks, per_chunk=0) == []


def _uchunks(n, prefix="doc"):
    return [UnitChunk(f"{prefix}::{i}", f"text {i}", f"h{i}") for i in range(n)]


def test_units_are_content_keyed():
    chunks = _uchunks(40)
    units = plan_units(chunks, [("doc::0", "doc::5")], "fp", target_chunks=4)
    assert [c for u in units for c in u.chunks] == chunks
    assert units[0].pairs[0][1].chunk_id == "doc::5"
    assert [u.key for u in plan_units(chunks, [("doc::0", "doc::5")], "fp", 4)] == [u.key for u in units]
    assert not {u.key for u in plan_units(chunks, [], "other settings", 4)} & {u.key for u in units}
    # a new chunk in the middle changes the unit around it, not the others
    grown = chunks[:20] + [UnitChunk("new::0", "new", "hn")] + chunks[20:]
    new_keys = {u.key for u in plan_units(grown, [("doc::0", "doc::5")], "fp", 4)}
    assert len({u.key for u in units} - new_keys) == 1
    with pytest.raises(ValueError, match="duplicate chunk id"):
        plan_units(chunks + chunks[:1], [], "fp")


def test_unit_files_are_written_atomically(tmp_path):
    write_unit_file(tmp_path, "k1", [{"type": "record", "record": {"a": 1}}, {"type": "stats", "chunks": 1}])
    assert list(read_unit_file(tmp_path, "k1"))[-1] == {"type": "stats", "chunks": 1}
    assert [p.name for p in unit_path(tmp_path, "k1").parent.iterdir()] == ["k1.jsonl"]

    def failing():
        yield {"type": "record", "record": {"a": 2}}
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        write_unit_file(tmp_path, "k2", failing())
    assert not unit_path(tmp_path, "k2").exists()


def test_transformers_engine_on_the_tiny_model(tiny_base):
    from clara.synth import TransformersEngine

    engine = TransformersEngine(tiny_base, batch_size=2)
    task = _qa_task()
    prompt = render_prompt(task_messages(task), engine.tokenizer)
    reqs = [GenerationRequest(task, prompt, max_tokens=16, temperature=0.0),
            GenerationRequest(task, prompt * 8, max_tokens=16)]  # longer than the model's 1024 positions
    ok, too_long = engine.generate(reqs)
    assert ok.error is None and 0 < ok.num_generated_tokens <= 16 and ok.num_input_tokens > 100
    assert too_long.error and "exceeds" in too_long.error
    out = process_generation(task, ok)  # random weights: garbage, but every outcome is accounted for
    assert out.items or out.rejects


def test_roundtrip_prompt_and_verdict():
    """The round trip asks the question of the item's passage(s) and keeps the pair only if the answer read
    back is the pair's."""
    from clara.synth import ROUNDTRIP_KIND, judge_tasks, roundtrip_prompt, roundtrip_verdict

    st = TaskState(_qa_task())
    st.absorb(process_generation(st.task, Generation(json.dumps({"qa": [
        {"question": "How tall is the Eiffel Tower?", "answer": "330 metres"}]}))))
    (rt,) = judge_tasks(st, st.items, ROUNDTRIP_KIND)
    assert rt.kind == "roundtrip" and rt.parent == st.task.key and rt.item == st.items[0]
    assert rt.key != judge_tasks(st, st.items)[0].key  # the judge and the round trip of one item are two tasks
    prompt = roundtrip_prompt(rt)
    assert prompt.endswith("Text: " + CHUNK + "\nQuestion: How tall is the Eiffel Tower?\nAnswer:")
    assert prompt.count("Question:") == prompt.count("Answer:") == 5  # four worked examples, then the item
    assert prompt.index("Question: When was the Eiffel Tower completed?\nAnswer: 1889\n") > 0

    def verdict(reply):
        return process_generation(rt, Generation(reply)).judge["supported"]

    assert verdict(" 330 metres\nText: more") is True  # the first line only
    assert verdict("The tower is 330 metres tall.") is True  # contains the answer
    assert verdict("330") is True  # token F1 0.67
    assert verdict("41 years") is False and verdict("Gustave Eiffel") is False
    assert verdict("  \n ") is None
    out = roundtrip_verdict("Paris", "Champ de Mars in Paris")  # F1 0.4: not the pair's answer
    assert out == {"supported": False, "reason": "read back 'Paris'"}
    from dataclasses import replace

    from clara.synth import request_for

    late = replace(rt, round=2)  # a later round samples hotter when it writes; a reading stays greedy
    assert request_for(late, prompt, max_tokens=24, temperature=0.2, top_p=0.9, seed=0, structured=False).temperature \
        == 0.0
    assert request_for(replace(late, kind="judge"), "", max_tokens=24, temperature=0.2, top_p=0.9, seed=0,
                       structured=False).temperature > 0.2
    multihop = Task(ROUNDTRIP_KIND, ("a", "b"), (CHUNK, OTHER), item={"question": "Q?", "answer": "A"})
    assert " ".join(CHUNK.split()) + " " + " ".join(OTHER.split()) in roundtrip_prompt(multihop)


def test_judge_replies():
    from clara.synth import judge_tasks

    st = TaskState(_qa_task())
    st.absorb(process_generation(st.task, Generation(json.dumps({"qa": [
        {"question": "How tall is the Eiffel Tower?", "answer": "330 metres"}]}))))
    (jt,) = judge_tasks(st, st.items)
    assert jt.kind == "judge" and jt.parent == st.task.key and "330 metres" in task_messages(jt)[1]["content"]
    verdict = process_generation(jt, Generation('{"supported": false, "reason": "The passage says 330."}'))
    assert verdict.judge == {"supported": False, "reason": "The passage says 330."}
    assert process_generation(jt, Generation('Verdict: {"supported": "yes"}')).judge["supported"] is True
    assert process_generation(jt, Generation("I think so.")).judge["supported"] is None
    st.reject_item(st.items[0], "judge_rejected", "no")
    assert not st.items and st.rejects[-1]["reason"] == "judge_rejected"
    para = Task("judge", ("a",), (CHUNK,), item={"text": "A rewrite."})
    assert "Rewrite:" in task_messages(para)[1]["content"]
