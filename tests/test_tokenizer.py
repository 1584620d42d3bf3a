"""Tokenizer tests: parity with transformers on the default model, sentencepiece
models trained here (as files, HF directories and GGUF vocabularies), and
streaming detokenization."""

import json
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # The reference must never reach for the hub.

import gguf  # noqa: E402
import pytest  # noqa: E402
import sentencepiece  # noqa: E402

from ridgeline.model.tokenizer import Tokenizer, load_tokenizer  # noqa: E402

TEXTS = [
    "Hello world! 😀🎉 Emoji 👩‍👩‍👧 and flags 🇫🇷.",
    "日本語のテキストです。中文字符 한국어 텍스트",
    "café naïve résumé Ångström façade Ελληνικά",
    "runs  of   spaces    and\ttabs\t\tand\n\nnewlines\n \n end  ",
    "digits 1234567890, 3.14159 and 1,000,000; 2024-01-31",
    "def square(x: int) -> int:\n    return x ** 2  # ok\n\nprint({'a': [1, 2]})\n",
    "I'm sure they'll say we've DON'T",
    "",
]
STREAM_TEXT = "Streaming 😀 日本語 naïve 🇫🇷 text, ok? 中文 done."

CONVERSATION = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "What is 2 + 2? 😀"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And in 日本語?"},
]
USER_ONLY = [{"role": "user", "content": "Hi there!"}]

SP_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! Numbers 12345 and  double  spaces.",
    "café naïve résumé déjà vu",
    "日本語のテキストと中文",
    "def f(x):\n\treturn x + 1",
] * 40


# -- The default model, against transformers ------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf) -> Tokenizer:
  return Tokenizer.from_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
  """transformers' own tokenizer for the same GGUF: the independent reference."""
  transformers = pytest.importorskip("transformers")
  path = pathlib.Path(smollm2_gguf)
  return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_default_model_metadata(smollm2):
  assert smollm2.vocab_size == 49152
  assert (smollm2.bos_id, smollm2.eos_ids, smollm2.pad_id) == (1, (2,), 2)
  assert not smollm2.add_bos
  assert smollm2.encode("<|im_start|>user<|im_end|>") == [1, 4093, 2]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(smollm2, reference, text):
  ids = smollm2.encode(text)
  assert ids == reference.encode(text, add_special_tokens=False)
  assert smollm2.decode(ids) == text


@pytest.mark.parametrize("messages", [CONVERSATION, USER_ONLY], ids=["conversation", "user"])
def test_chat_template_matches_transformers(smollm2, reference, messages):
  text = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  ids = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
  ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # A BatchEncoding in transformers 5.
  assert smollm2.apply_chat_template(messages) == text
  assert smollm2.encode_chat(messages) == list(ids)
  assert not smollm2.apply_chat_template(messages, add_generation_prompt=False).endswith(
      "assistant\n")


@pytest.fixture(scope="module")
def smollm2_fields(smollm2_gguf) -> dict:
  fields = gguf.GGUFReader(smollm2_gguf).fields
  return {key: fields[f"tokenizer.ggml.{key}"].contents()
          for key in ("tokens", "token_type", "merges")}


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_gguf_pre_tokenizer_types(smollm2_fields, tmp_path, pre):
  """The default vocabulary re-declared with other split regexes: same as transformers."""
  transformers = pytest.importorskip("transformers")
  path = tmp_path / f"{pre}.gguf"
  writer = gguf.GGUFWriter(str(path), arch="llama")
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(smollm2_fields["tokens"])
  writer.add_token_types(smollm2_fields["token_type"])
  writer.add_token_merges(smollm2_fields["merges"])
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  tok = Tokenizer.from_gguf(path)
  reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
  assert tok.add_bos == (pre == "llama-bpe")  # llama.cpp's default for Llama 3 files.
  for text in [*TEXTS, "I'M HERE, you'LL see:\r\n\r\n\t12345678 !!! ???\n  x"]:
    assert tok.encode(text, add_bos=False) == reference.encode(text, add_special_tokens=False)


def test_hf_dir_written_by_transformers(smollm2, reference, tmp_path):
  reference.save_pretrained(tmp_path)
  for tok in (load_tokenizer(tmp_path), Tokenizer.from_hf_dir(tmp_path)):
    assert (tok.eos_ids, tok.pad_id, tok.add_bos) == ((2,), 2, False)
    assert tok.chat_template == smollm2.chat_template
    assert [tok.encode(t) for t in TEXTS] == [smollm2.encode(t) for t in TEXTS]
  bare = load_tokenizer(tmp_path / "tokenizer.json")
  assert bare.encode(TEXTS[0]) == smollm2.encode(TEXTS[0])
  assert bare.eos_ids == (2,)  # Nothing declares EOS: the first well-known end token found.


# -- Sentencepiece ---------------------------------------------------------------


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> pathlib.Path:
  """A Llama-style sentencepiece model (BPE, byte fallback, no normalization)."""
  path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
  with path.open("wb") as f:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_CORPUS), model_writer=f, model_type="bpe",
        vocab_size=400,  # Byte fallback alone needs 256 + 3 pieces.
        byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, minloglevel=2)
  return path


@pytest.fixture(scope="module")
def sp(sp_model) -> sentencepiece.SentencePieceProcessor:
  return sentencepiece.SentencePieceProcessor(model_file=str(sp_model))


def test_sentencepiece_round_trip(sp_model, sp):
  for tok in (load_tokenizer(sp_model), Tokenizer.from_sentencepiece(sp_model.read_bytes())):
    assert (tok.vocab_size, tok.bos_id, tok.eos_ids, tok.add_bos) == (400, 1, (2,), True)
    for text in TEXTS:
      assert tok.encode(text) == [1, *sp.encode(text)]
      assert tok.encode(text, add_bos=False) == sp.encode(text)
      assert tok.decode(tok.encode(text)) == text
    # Control tokens in text are matched whole, and kept by decode when asked.
    ids = tok.encode("<s>Hi</s>", add_bos=False)
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids, skip_special_tokens=False) == "<s>Hi</s>"
    assert tok.decode(ids) == "Hi"


def test_sentencepiece_hf_dir(sp_model, sp, tmp_path):
  (tmp_path / "tokenizer.model").write_bytes(sp_model.read_bytes())
  template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
              "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({
      "bos_token": {"content": "<s>"}, "eos_token": "</s>", "add_bos_token": True,
      "chat_template": template}))
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
  tok = load_tokenizer(tmp_path)
  assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (1, (2, 3), True)
  assert tok.apply_chat_template(USER_ONLY) == "<s>[user] Hi there!</s>[assistant]"
  ids = tok.encode_chat(USER_ONLY)
  assert ids.count(1) == 1 and ids[0] == 1  # The template's BOS, not doubled.
  # Text after a control token gets sentencepiece's dummy-prefix space, as in
  # llama.cpp and Meta's Llama 2 prompts (each segment encoded on its own).
  assert ids[-len(sp.encode("[assistant]")):] == sp.encode("[assistant]")
  assert tok.decode(ids) == "[user] Hi there! [assistant]"


def _write_spm_gguf(path: pathlib.Path, sp_model: pathlib.Path, model: str = "llama"):
  """A GGUF holding only a tokenizer, the way llama.cpp's converter writes one."""
  from sentencepiece import sentencepiece_model_pb2

  proto = sentencepiece_model_pb2.ModelProto.FromString(sp_model.read_bytes())
  writer = gguf.GGUFWriter(str(path), arch="llama")
  writer.add_tokenizer_model(model)
  writer.add_token_list([p.piece for p in proto.pieces])
  writer.add_token_scores([p.score for p in proto.pieces])
  writer.add_token_types([p.type for p in proto.pieces])
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_unk_token_id(0)
  writer.add_add_bos_token(True)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def test_gguf_sentencepiece_vocab(sp_model, sp, tmp_path):
  path = tmp_path / "spm.gguf"
  _write_spm_gguf(path, sp_model)
  tok = load_tokenizer(path)
  assert (tok.vocab_size, tok.bos_id, tok.eos_ids, tok.add_bos) == (400, 1, (2,), True)
  for text in TEXTS:
    assert tok.encode(text, add_bos=False) == sp.encode(text)
    assert tok.decode(tok.encode(text)) == text


def test_unknown_gguf_tokenizer_model(sp_model, tmp_path):
  path = tmp_path / "odd.gguf"
  _write_spm_gguf(path, sp_model, model="rwkv")
  with pytest.raises(ValueError, match="rwkv"):
    Tokenizer.from_gguf(path)


# -- Streaming -----------------------------------------------------------------


def _check_incremental(tok: Tokenizer, ids: list[int]):
  full = tok.decode(ids)
  assert "\ufffd" not in full
  detok = tok.detokenizer()
  deltas = [detok.push(i) for i in ids]
  assert not any("\ufffd" in delta for delta in deltas)
  assert "".join(deltas) + detok.flush() == detok.text == full
  for k in range(len(ids)):  # Stopping anywhere: what was streamed, plus flush, is the text.
    detok = tok.detokenizer()
    streamed = "".join(detok.push(i) for i in ids[:k])
    assert tok.decode(ids[:k]).startswith(streamed)
    assert streamed + detok.flush() == tok.decode(ids[:k])


def test_incremental_detokenizer_byte_level(smollm2):
  ids = smollm2.encode(STREAM_TEXT)
  assert len(ids) > len(STREAM_TEXT.split())  # Multi-byte characters span several tokens.
  _check_incremental(smollm2, ids)


def test_incremental_detokenizer_sentencepiece(sp_model):
  tok = load_tokenizer(sp_model)
  _check_incremental(tok, tok.encode(STREAM_TEXT + "  and  spaces "))


def test_incremental_detokenizer_special_tokens(smollm2):
  ids = smollm2.encode_chat(CONVERSATION) + smollm2.encode("Vier. 😀<|im_end|>")
  _check_incremental(smollm2, ids)
  detok = smollm2.detokenizer(skip_special_tokens=False)
  streamed = "".join(detok.push(i) for i in ids) + detok.flush()
  assert streamed == smollm2.decode(ids, skip_special_tokens=False)


def test_incremental_detokenizer_after_prompt(smollm2, sp_model):
  # A sentencepiece reply starts with "▁is"; decoded after the prompt, its space survives.
  for tok, expected in ((smollm2, "is 😀 42."), (load_tokenizer(sp_model), " is 😀 42.")):
    prompt, reply = tok.encode("The answer"), tok.encode("is 😀 42.", add_bos=False)
    detok = tok.detokenizer(prompt_ids=prompt)
    streamed = "".join(detok.push(i) for i in reply) + detok.flush()
    assert streamed == detok.text == expected
    assert streamed == tok.decode(prompt + reply)[len(tok.decode(prompt)):]
