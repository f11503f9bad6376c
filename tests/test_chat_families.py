"""Tokenize on the chat layouts of the families people train (tests/chat_families.py): prompt +
completion ids are the template's rendering of the conversation, completions end at the family's
end of turn with no EOS the template does not render, nothing a person would keep is dropped, and
generate/eval stop on the same tokens."""

import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from transformers import AutoTokenizer

from prefdata.tokenize import TokenizeConfig, tokenize
from schemas.errors import UserError
from schemas.render import make_renderer, parse_chat_template_kwargs, prompt_token_ids, stop_token_ids
from tests.chat_families import FAMILIES, Family
from tests.conftest import CORPUS
from tests.records_factory import make_record, write_records_dir
from train.tiny import build_tokenizer

RECORDS = [
    make_record([("system", "You are a helpful assistant."), ("user", "What is the capital of France?"),
                 ("assistant", "Paris."), ("user", "And of Italy?")], "The capital of Italy is Rome.", "I do not know.", row=1),
    make_record([("system", "Answer briefly."), ("user", "Write a haiku about autumn.")],
                "Leaves fall on the pond.", "No.", row=2),
    make_record([("user", "hello there, can you help me?"), ("assistant", "Of course, what do you need?"),
                 ("user", "Explain how a hash table works.")], "It maps keys to slots with a hash.", "It is a table.", row=3),
    make_record("The movie was a delight, was it not?", "It was warm and funny.", "It was dull.", row=4),
]
BY_NAME = {family.name: family for family in FAMILIES}


@pytest.fixture(scope="module")
def family_tokenizers(tmp_path_factory):
    """One tokenizer per layout, trained on the fly with the family's special tokens."""
    built: dict[str, str] = {}

    def get(family: Family) -> str:
        key = f"{family.layout.eos}-{family.layout.bos}"
        if key not in built:
            built[key] = str(build_tokenizer(CORPUS, tmp_path_factory.mktemp("family-tok"), layout=family.layout,
                                             add_bos=family.add_bos))
        return built[key]

    return get


def _rows(directory):
    with pa.memory_map(str(directory / "train-00000.arrow")) as source:
        return ipc.open_file(source).read_all().to_pylist()


def _fold(messages: list[dict]) -> list[dict]:
    """What the family's model card advises for a template without a system role."""
    if messages[0]["role"] != "system":
        return messages
    return [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}, *messages[2:]]


def _specials(tok, ids: list[int]) -> list[int]:
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items()}
    return [i for i in ids if i in special]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_prompt_and_completion_ids_are_the_templates_rendering(family, family_tokenizers, tmp_path):
    tokenizer_dir = family_tokenizers(family)
    kwargs = dict(family.template_kwargs)
    src = write_records_dir(tmp_path / "in", {"train": RECORDS, "eval": []})
    manifest = tokenize(TokenizeConfig(input_dir=str(src), tokenizer=tokenizer_dir, out=str(tmp_path / "s"), workers=1,
                                       chat_template_kwargs=kwargs))
    assert manifest.counts.kept == len(RECORDS) and manifest.counts.dropped == {}  # nothing a person would keep is lost
    assert manifest.stats["end_of_turn"] == family.end_of_turn and manifest.stats["prompt_rule"] == family.prompt_rule
    assert manifest.config["chat_template_kwargs"] == kwargs
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    end_ids = tok(family.end_of_turn, add_special_tokens=False).input_ids
    for record, row in zip(RECORDS, _rows(tmp_path / "s")):
        messages = [m.model_dump() for m in record.prompt]
        fitted = messages if family.system_role else _fold(messages)
        generation = tok.apply_chat_template(fitted, add_generation_prompt=True, tokenize=False, **kwargs)
        prompt_text = tok.decode(row["prompt_input_ids"])
        if family.prompt_rule == "generation_prompt":
            assert row["prompt_input_ids"] == tok(generation, add_special_tokens=False).input_ids
        else:  # the generation prompt's <think> opener is what a rendered conversation never has
            assert generation == prompt_text + manifest.stats["generation_tail_left_out"]
        for side in ("chosen", "rejected"):
            answer = {"role": "assistant", "content": getattr(record, side)[0].content}
            full = tok.apply_chat_template(fitted + [answer], tokenize=False, **kwargs)
            expected = full[: full.rindex(family.end_of_turn) + len(family.end_of_turn)]
            completion = row[f"{side}_input_ids"]
            assert prompt_text + tok.decode(completion) == expected
            assert completion[-len(end_ids):] == end_ids  # ends at the end of turn, with an EOS only where rendered
            # No doubled EOS, no special token cut or added at the prompt/completion boundary.
            assert _specials(tok, row["prompt_input_ids"] + completion) == _specials(tok, tok(expected, add_special_tokens=False).input_ids)
            assert answer["content"].strip() in tok.decode(completion, skip_special_tokens=True)
        if family.add_bos and tok.bos_token_id is not None:
            assert row["prompt_input_ids"].count(tok.bos_token_id) <= 1


def test_gemma_completion_has_no_eos_and_r1_prompt_drops_the_think_opener(family_tokenizers, tmp_path):
    """The two defects issue 24 found, spelled out: Gemma completions ended <end_of_turn><eos>, and
    every DeepSeek-R1 distill record was dropped as template_mismatch."""
    for name in ("gemma", "deepseek-r1"):
        family = BY_NAME[name]
        src = write_records_dir(tmp_path / name / "in", {"train": RECORDS, "eval": []})
        manifest = tokenize(TokenizeConfig(input_dir=str(src), tokenizer=family_tokenizers(family), out=str(tmp_path / name / "s")))
        tok = AutoTokenizer.from_pretrained(family_tokenizers(family))
        rows = _rows(tmp_path / name / "s")
        assert manifest.counts.kept == len(RECORDS)
        if name == "gemma":
            assert all(tok.eos_token_id not in row["chosen_input_ids"] for row in rows)
            assert tok.decode(rows[1]["chosen_input_ids"]) == "Leaves fall on the pond.<end_of_turn>"
            assert manifest.stats["system_turns_folded"] == 2
        else:
            assert manifest.stats["generation_tail_left_out"] == "<think>\n"
            assert tok.decode(rows[1]["prompt_input_ids"]).endswith("Write a haiku about autumn.<｜Assistant｜>")
            assert tok.decode(rows[1]["chosen_input_ids"]) == "Leaves fall on the pond.<｜end▁of▁sentence｜>"


def test_qwen3_thinking_option_reaches_the_template(family_tokenizers, tmp_path):
    tokenizer_dir = family_tokenizers(BY_NAME["qwen3"])
    src = write_records_dir(tmp_path / "in", {"train": RECORDS[3:], "eval": []})
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    decoded = {}
    for option in ("", "enable_thinking=false"):
        out = tmp_path / (option or "default")
        tokenize(TokenizeConfig(input_dir=str(src), tokenizer=tokenizer_dir, out=str(out), chat_template_kwargs=option))
        (row,) = _rows(out)
        decoded[option] = (tok.decode(row["prompt_input_ids"]), tok.decode(row["chosen_input_ids"]))
    assert decoded[""][0].endswith("<|im_start|>assistant\n")
    assert decoded[""][1] == "<think>\n\n</think>\n\nIt was warm and funny.<|im_end|>"  # the model writes the empty think block
    assert decoded["enable_thinking=false"][0].endswith("<think>\n\n</think>\n\n")
    assert decoded["enable_thinking=false"][1] == "It was warm and funny.<|im_end|>"


def test_system_turn_drop_and_template_errors_are_counted_per_record(family_tokenizers, tmp_path):
    """Gemma raises on a system turn and on roles that do not alternate: with --system-turn drop
    the system records are refused with their own reason, and the record the template raises on
    is refused alone — the rest of its batch is tokenized."""
    broken = make_record([("user", "Hi."), ("user", "Hello?")], "Hello!", "Go away.", row=9)
    src = write_records_dir(tmp_path / "in", {"train": [*RECORDS, broken], "eval": []})
    manifest = tokenize(TokenizeConfig(input_dir=str(src), tokenizer=family_tokenizers(BY_NAME["gemma"]), out=str(tmp_path / "s"),
                                       system_turn="drop", workers=1))
    assert manifest.counts.dropped == {"system_not_supported": 2, "template_error": 1}
    assert manifest.counts.kept == 2 and manifest.stats["system_role"] == "drop"
    dropped = pl.read_parquet(tmp_path / "s" / "dropped.parquet")
    assert dict(zip(dropped["id"], dropped["drop_reason"])) == {RECORDS[0].id: "system_not_supported",
                                                               RECORDS[1].id: "system_not_supported", broken.id: "template_error"}


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_stop_tokens_are_the_end_of_turn_and_the_generation_eos(family, family_tokenizers):
    tok = AutoTokenizer.from_pretrained(family_tokenizers(family))
    renderer = make_renderer(tok, "auto", dict(family.template_kwargs))
    generation_eos = tok.convert_tokens_to_ids(list(family.generation_eos))
    expected = {*tok(family.end_of_turn, add_special_tokens=False).input_ids, tok.eos_token_id, *generation_eos}
    assert stop_token_ids(renderer, generation_eos) == sorted(expected)
    # Without a generation config the end of turn still stops a sample (Gemma: <end_of_turn>, not <eos>).
    first_end = tok(family.end_of_turn, add_special_tokens=False).input_ids[0]
    assert first_end in stop_token_ids(renderer, None)


def test_generate_prompts_are_the_shards_prompts(family_tokenizers, tmp_path):
    """generate and eval render prompts through prompt_token_ids: the same ids tokenize stores,
    under the shared-prefix rule and a folded system turn too."""
    for name in ("deepseek-r1", "gemma"):
        tokenizer_dir = family_tokenizers(BY_NAME[name])
        src = write_records_dir(tmp_path / name / "in", {"train": RECORDS, "eval": []})
        tokenize(TokenizeConfig(input_dir=str(src), tokenizer=tokenizer_dir, out=str(tmp_path / name / "s")))
        ids, reasons = prompt_token_ids(make_renderer(AutoTokenizer.from_pretrained(tokenizer_dir), "auto"),
                                        [[m.model_dump() for m in r.prompt] for r in RECORDS])
        assert ids == [row["prompt_input_ids"] for row in _rows(tmp_path / name / "s")] and reasons == [None] * len(RECORDS)


@pytest.mark.parametrize(("text", "parsed"), [
    ('{"enable_thinking": false}', {"enable_thinking": False}),
    ("enable_thinking=false, depth=2, mode=fast", {"enable_thinking": False, "depth": 2, "mode": "fast"}),
    ("", {}),
])
def test_chat_template_kwargs_parse(text, parsed):
    assert parse_chat_template_kwargs(text) == parsed


@pytest.mark.parametrize(("text", "message"), [("{not json", "not a JSON object"), ("enable_thinking", "not key=value"),
                                               ("tokenize=true", "set by prefdata itself")])
def test_chat_template_kwargs_bad_values_are_one_line_errors(text, message):
    with pytest.raises(UserError, match=message):
        parse_chat_template_kwargs(text)


def test_a_template_that_cannot_render_an_exchange_is_a_user_error(tmp_path):
    from train.tiny import ChatLayout

    broken = ChatLayout("{{ raise_exception('needs tools') }}", "<s>", "</s>", ())
    tok = AutoTokenizer.from_pretrained(build_tokenizer(CORPUS, tmp_path / "tok", layout=broken))
    with pytest.raises(UserError, match="cannot render a user/assistant exchange"):
        make_renderer(tok, "auto")


def test_generate_refuses_shards_tokenized_with_other_template_options(family_tokenizers, tmp_path):
    from train.generate import GenerateConfig, generate

    src = write_records_dir(tmp_path / "in", {"train": RECORDS, "eval": []})
    shards = tmp_path / "s"
    tokenize(TokenizeConfig(input_dir=str(src), tokenizer=family_tokenizers(BY_NAME["qwen3"]), out=str(shards),
                            chat_template_kwargs="enable_thinking=false"))
    with pytest.raises(UserError, match="tokenized with --chat-template-kwargs"):
        generate(GenerateConfig(prompts=str(shards), policy=str(tmp_path / "policy"), out=str(tmp_path / "g")))


def test_answers_the_template_renders_alike_are_dropped_with_their_reason(family_tokenizers, tmp_path):
    """DeepSeek-R1's template keeps only what follows `</think>` in an assistant turn: two answers
    differing only in their reasoning become one completion, a pair with nothing to prefer."""
    records = [make_record("Is 7 prime?", "<think>7 has no divisor but 1 and 7</think>Yes.",
                           "<think>7 is odd, so maybe</think>Yes.", row=1),
               make_record("Is 9 prime?", "<think>3 divides 9</think>No.", "<think>9 is odd</think>Yes.", row=2)]
    src = write_records_dir(tmp_path / "in", {"train": records, "eval": []})
    manifest = tokenize(TokenizeConfig(input_dir=str(src), tokenizer=family_tokenizers(BY_NAME["deepseek-r1"]),
                                       out=str(tmp_path / "s")))
    assert manifest.counts.kept == 1 and manifest.counts.dropped == {"identical_after_rendering": 1}


def test_generate_renders_shard_prompts_as_the_shards_were_rendered(family_tokenizers, tmp_path):
    """Shards tokenized with the plain template and system turns dropped: generate takes both from
    them (it took its own defaults, and sampled prompts the shards never held); an explicit other
    template is refused."""
    from train.generate import GenerateConfig, _rendering

    src = write_records_dir(tmp_path / "in", {"train": RECORDS, "eval": []})
    tokenize(TokenizeConfig(input_dir=str(src), tokenizer=family_tokenizers(BY_NAME["gemma"]), out=str(tmp_path / "s"),
                            template="plain", system_turn="drop"))
    config = GenerateConfig(prompts=str(tmp_path / "s"), policy="unused", out=str(tmp_path / "g"))
    assert _rendering(config) == ("plain", "drop")
    with pytest.raises(UserError, match="tokenized with --template plain"):
        _rendering(config.model_copy(update={"template": "chat"}))
