"""GR00T processor: prompt layout, image transform, normalisation, action mapping (CPU)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from models.gr00t import Gr00tConfig
from models.gr00t_processor import (
    SPECIAL_TOKENS,
    AffineNormalizer,
    BuiltinTokenizer,
    Gr00tMetadata,
    Gr00tProcessor,
    HFTokenizer,
    chat_prompt,
    metadata_from_data,
    pixel_values,
    postprocess_gripper,
)

SHARED_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "gr00t_n15_tokenizer"
STATE_DIMS = {"x": 1, "y": 1, "z": 1, "roll": 1, "pitch": 1, "yaw": 1, "gripper": 2}   # stack-cube: 8
ACTION_DIMS = {"x": 1, "y": 1, "z": 1, "roll": 1, "pitch": 1, "yaw": 1, "gripper": 1}  # 7


def make_metadata(seed=0, frames=200, resolution=(256, 256)) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(frames, d, generator=g) * 0.3 + 0.1 for k, d in STATE_DIMS.items()}
    action = {k: torch.rand(frames, d, generator=g) * 2 - 1 for k, d in ACTION_DIMS.items()}
    action["gripper"] = torch.where(action["gripper"] > 0, 1.0, -1.0)
    return metadata_from_data("new_embodiment", state, action, {"table_cam": resolution,
                                                                "wrist_cam": resolution})


def make_processor(cfg=None, metadata=None, tokenizer=None) -> Gr00tProcessor:
    cfg = cfg or Gr00tConfig.preset("gr00t-tiny")
    tok = tokenizer or BuiltinTokenizer(cfg.vocab_size)
    return Gr00tProcessor(cfg, Gr00tMetadata(metadata or make_metadata()), tok, "cpu")


# -- prompt --------------------------------------------------------------------------------------------------------
needs_real_tokenizer = pytest.mark.skipif(not SHARED_TOKENIZER.exists(),
                                          reason="the real GR00T tokenizer files are not beside the repo")


@pytest.fixture(scope="module")
def real_tokenizer():
    return HFTokenizer(str(SHARED_TOKENIZER))


def official_prompt_text(tokenizer, instruction: str, num_views: int, tokens_per_view: int) -> str:
    """The official path: Eagle's chat template (from chat_template.json), then the processor's placeholder
    expansion `<image-k>` -> `<image k><img>` + tokens_per_view x <IMG_CONTEXT> + `</img>`."""
    template = json.loads((SHARED_TOKENIZER / "chat_template.json").read_text())["chat_template"]
    content = [{"type": "image", "image": f"view{k}"} for k in range(num_views)] + [{"type": "text",
                                                                                   "text": instruction}]
    text = tokenizer._tok.apply_chat_template([{"role": "user", "content": content}], chat_template=template,
                                               tokenize=False, add_generation_prompt=True)
    return re.sub(r"<image-(\d+)>",
                  lambda m: f"<image {m.group(1)}><img>{'<IMG_CONTEXT>' * tokens_per_view}</img>", text)


@needs_real_tokenizer
def test_prompt_with_the_real_tokenizer_matches_the_official_chat_template(real_tokenizer):
    tok = real_tokenizer
    cfg = Gr00tConfig.preset("gr00t-n1.5-3b")
    proc = make_processor(cfg, tokenizer=tok)
    instruction = "Stack the red block on the blue block, then stack the green block on the red block."
    ids, positions = proc.prompt(instruction)
    expected = tok.encode(official_prompt_text(tok, instruction, 2, 256))
    assert ids.tolist() == expected
    # the image tokens: two contiguous blocks of 256 x 151669, each between <img> and </img>
    assert (ids[positions] == 151669).all() and len(positions) == 512
    assert int((ids == 151669).sum()) == 512
    for block in (positions[:256], positions[256:]):
        assert (block.diff() == 1).all()
        assert ids[block[0] - 1] == tok.token_id("<img>") == 151670
        assert ids[block[-1] + 1] == tok.token_id("</img>") == 151671
    assert ids[0] == tok.token_id("<|im_start|>") == 151644
    assert tok.decode(ids[positions[-1] + 2:].tolist()) == instruction + "<|im_end|>\n<|im_start|>assistant\n"


@needs_real_tokenizer
def test_a_plain_qwen3_tokenizer_gets_eagles_tokens(tmp_path, real_tokenizer):
    """Qwen/Qwen3-1.7B's tokenizer lacks Eagle's tokens: they are added at the official ids (151669 ...)."""
    eagle = ("<IMG_CONTEXT>", "<img>", "</img>", "<box>", "</box>", "<quad>", "</quad>", "<ref>", "</ref>",
             "<interval>", "</interval>")
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((SHARED_TOKENIZER / name).read_bytes())
    config = json.loads((SHARED_TOKENIZER / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {i: t for i, t in config["added_tokens_decoder"].items() if int(i) < 151669}
    config["additional_special_tokens"] = [t for t in config["additional_special_tokens"] if t not in eagle]
    for key in ("auto_map", "processor_class", "chat_template"):
        config.pop(key)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    qwen = HFTokenizer(str(tmp_path))
    eagle_tok = real_tokenizer
    assert [qwen.token_id(t) for t in eagle] == [eagle_tok.token_id(t) for t in eagle] == list(range(151669, 151680))
    text = chat_prompt("Pick up the cube.", 2, 4)
    assert qwen.encode(text) == eagle_tok.encode(text)


def test_builtin_tokenizer_prompt_layout():
    cfg = Gr00tConfig.preset("gr00t-tiny")
    tok = BuiltinTokenizer(cfg.vocab_size)
    proc = make_processor(cfg, tokenizer=tok)
    ids, positions = proc.prompt("stack it")
    text = chat_prompt("stack it", 2, cfg.tokens_per_view)
    assert tok.decode(ids.tolist()) == text
    assert tok.token_id("<IMG_CONTEXT>") == cfg.image_token_id == 256 + SPECIAL_TOKENS.index("<IMG_CONTEXT>")
    assert len(positions) == 2 * cfg.tokens_per_view == 512
    assert (ids[positions] == cfg.image_token_id).all() and int((ids == cfg.image_token_id).sum()) == 512
    # each view: "<image k>" as text, then <img>, 256 image tokens, </img>
    first = positions[0].item()
    assert tok.decode(ids[:first].tolist()).endswith("<|im_start|>user\n<image 1><img>")
    assert ids[positions[255] + 1] == tok.token_id("</img>")
    assert tok.decode(ids[positions[255] + 2:positions[256]].tolist()) == "<image 2><img>"
    assert ids.max() < cfg.vocab_size
    # the same ids as the official Qwen/Eagle ones when the vocabulary is the real one
    big = BuiltinTokenizer(151680)
    assert [big.token_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<IMG_CONTEXT>", "<img>", "</interval>")] == [
        151643, 151644, 151669, 151670, 151679]


def test_prompt_checks_tokenizer_and_is_cached():
    cfg = Gr00tConfig.preset("gr00t-tiny")
    wrong = Gr00tConfig.preset("gr00t-tiny", image_token_id=5)
    with pytest.raises(ValueError, match="<IMG_CONTEXT>.*id 282.*expects 5"):
        make_processor(wrong, tokenizer=BuiltinTokenizer(cfg.vocab_size)).prompt("x")
    proc = make_processor(cfg)
    assert proc.prompt("a")[0] is proc.prompt("a")[0]
    # an empty instruction becomes GR00T's default instruction
    assert BuiltinTokenizer(cfg.vocab_size).decode(proc.prompt("")[0].tolist()).endswith(
        "Perform the default behavior.<|im_end|>\n<|im_start|>assistant\n")


def test_tokenizer_load_failure_names_the_source(tmp_path):
    with pytest.raises(RuntimeError, match="could not load the GR00T tokenizer from .*nowhere"):
        HFTokenizer(str(tmp_path / "nowhere"))


# -- images --------------------------------------------------------------------------------------------------------
def test_pixel_values_match_torchvision_crop_resize():
    from torchvision.transforms import v2

    g = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (2, 2, 256, 256, 3), dtype=torch.uint8, generator=g)
    out = pixel_values(rgb, 224, 0.95)
    assert out.shape == (4, 3, 224, 224) and out.dtype == torch.float32
    # official eval transforms: VideoCrop (centre crop 0.95) + VideoResize(224, linear, antialias) on uint8 frames,
    # then the Eagle processor: rescale 1/255, normalise with mean = std = 0.5
    frames = rgb.reshape(4, 256, 256, 3).permute(0, 3, 1, 2)
    ref = v2.Resize((224, 224), interpolation=v2.InterpolationMode.BILINEAR, antialias=True)(
        v2.CenterCrop((243, 243))(frames))
    ref = (ref.float() / 255 - 0.5) / 0.5
    diff = (out - ref).abs()
    assert diff.max() <= 2 / 255 + 1e-6      # at most one uint8 step apart (rounding of the two resizes)
    assert diff.mean() < 0.002
    assert out.min() >= -1 and out.max() <= 1


def test_pixel_values_without_resize_is_exact():
    rgb = torch.arange(2 * 236 * 236 * 3, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(1, 2, 236, 236, 3)
    out = pixel_values(rgb, 224, 0.95)                      # int(236 * 0.95) = 224: crop only
    ref = rgb[0, :, 6:230, 6:230].permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_input_checks_name_the_problem():
    proc = make_processor()
    good = torch.zeros(2, 2, 256, 256, 3, dtype=torch.uint8)
    proc.check_rgb(good)
    with pytest.raises(ValueError, match="expects 256x256"):
        proc.check_rgb(torch.zeros(2, 2, 128, 128, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        proc.check_rgb(good.float())
    with pytest.raises(ValueError, match="3 views"):
        proc.check_rgb(torch.zeros(2, 3, 256, 256, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[N, 8\]"):
        proc.check_state(torch.zeros(2, 7))
    with pytest.raises(ValueError, match="video views"):
        make_processor(Gr00tConfig.preset("gr00t-tiny", num_views=1))


# -- normalisation -------------------------------------------------------------------------------------------------
def official_normalize(x, s, mode):
    """StateActionTransform's Normalizer.forward, per key (Isaac-GR00T 1259d624)."""
    s = {k: torch.tensor(v, dtype=x.dtype) for k, v in s.items()}
    if mode == "min_max":
        mask = s["min"] != s["max"]
        out = torch.zeros_like(x)
        out[..., mask] = (x[..., mask] - s["min"][mask]) / (s["max"][mask] - s["min"][mask]) * 2 - 1
        return out
    if mode == "q99":
        mask = s["q01"] != s["q99"]
        out = x.clone()
        out[..., mask] = (x[..., mask] - s["q01"][mask]) / (s["q99"][mask] - s["q01"][mask]) * 2 - 1
        return out.clamp(-1, 1)
    if mode == "mean_std":
        mask = s["std"] != 0
        out = x.clone()
        out[..., mask] = (x[..., mask] - s["mean"][mask]) / s["std"][mask]
        return out
    raise ValueError(mode)


@pytest.mark.parametrize("mode", ["min_max", "q99", "mean_std"])
def test_normalization_matches_the_official_formulas_and_round_trips(mode):
    meta = make_metadata()
    stats = meta["statistics"]["state"]
    stats["gripper"]["min"][1] = stats["gripper"]["max"][1] = 0.04    # a degenerate dim
    stats["gripper"]["q01"][1] = stats["gripper"]["q99"][1] = 0.04
    stats["gripper"]["std"][1] = 0.0
    keys = tuple(STATE_DIMS)
    norm = AffineNormalizer.from_stats(stats, dict.fromkeys(keys, mode))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 8, generator=g) * 0.3 + 0.1
    ref, start = [], 0
    for k in keys:
        d = STATE_DIMS[k]
        ref.append(official_normalize(x[..., start:start + d], stats[k], mode))
        start += d
    y = norm.normalize(x)
    torch.testing.assert_close(y, torch.cat(ref, -1), atol=1e-5, rtol=1e-5)
    back = norm.unnormalize(y)
    if mode == "min_max":      # degenerate dims normalise to 0 and come back as the constant
        assert (y[..., 7] == 0).all() and torch.allclose(back[..., 7], torch.full_like(back[..., 7], 0.04))
    else:                      # identity on degenerate dims (q99 also clips them to [-1, 1])
        torch.testing.assert_close(y[..., 7], x[..., 7].clamp(-1, 1) if mode == "q99" else x[..., 7])
    inside = slice(0, 7)
    if mode == "q99":          # the round trip holds inside [q01, q99]
        lo = torch.tensor([v for k in keys for v in stats[k]["q01"]])[inside]
        hi = torch.tensor([v for k in keys for v in stats[k]["q99"]])[inside]
        x = torch.minimum(torch.maximum(x[..., inside], lo), hi)
        back = norm.unnormalize(norm.normalize(torch.cat([x, torch.zeros(5, 3, 1)], -1)))
        torch.testing.assert_close(back[..., inside], x, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(back[..., inside], x[..., inside], atol=1e-5, rtol=1e-5)


def test_binary_mode_and_unknown_mode():
    stats = {"g": {"min": [0.0], "max": [1.0], "mean": [0.5], "std": [0.5], "q01": [0.0], "q99": [1.0]}}
    norm = AffineNormalizer.from_stats(stats, {"g": "binary"})
    assert norm.normalize(torch.tensor([[0.2], [0.7]])).tolist() == [[0.0], [1.0]]
    assert norm.unnormalize(torch.tensor([[0.4], [0.9]])).tolist() == [[0.0], [1.0]]
    with pytest.raises(ValueError, match="unknown normalisation mode 'zscore'"):
        AffineNormalizer.from_stats(stats, {"g": "zscore"})


def test_metadata_statistics_match_numpy():
    g = np.random.default_rng(0)
    state = {"pos": g.normal(size=(500, 3)).astype(np.float32)}
    action = {"delta": g.uniform(-1, 1, size=(500, 2)).astype(np.float32)}
    meta = metadata_from_data("new_embodiment", state, action, {"cam": (320, 240)})
    s = meta["statistics"]["state"]["pos"]
    x = state["pos"].astype(np.float64)
    for name, ref in [("min", x.min(0)), ("max", x.max(0)), ("mean", x.mean(0)), ("std", x.std(0)),
                      ("q01", np.quantile(x, 0.01, axis=0)), ("q99", np.quantile(x, 0.99, axis=0))]:
        np.testing.assert_allclose(s[name], ref, rtol=1e-6, atol=1e-7)
    assert meta["modalities"]["state"]["pos"]["shape"] == [3]
    assert meta["modalities"]["video"]["cam"]["resolution"] == [320, 240]
    assert Gr00tMetadata(meta).resolution() == (240, 320)     # (H, W)
    json.dumps(meta)                                           # JSON-serialisable as metadata.json


def test_state_is_normalised_and_zero_padded():
    proc = make_processor()
    state = torch.randn(3, 8)
    out = proc.normalize_state(state)
    assert out.shape == (3, 64)
    assert (out[:, 8:] == 0).all()
    torch.testing.assert_close(out[:, :8], proc.state_norm.normalize(state))


# -- actions -------------------------------------------------------------------------------------------------------
def test_action_unnormalisation_to_env_units():
    cfg = Gr00tConfig.preset("gr00t-tiny", executed_actions=5)
    meta = make_metadata()
    proc = make_processor(cfg, meta)
    stats = meta["statistics"]["action"]
    lo = torch.tensor([stats[k]["min"][0] for k in ACTION_DIMS])
    hi = torch.tensor([stats[k]["max"][0] for k in ACTION_DIMS])
    chunk = torch.zeros(2, 16, 32)
    chunk[0, :, :7] = -1.0
    chunk[1, :, :7] = 1.0
    chunk[:, :, 7:] = 123.0                      # padded dims never reach the env
    chunk[:, 6:, :] = 7.0                        # nor do actions past the executed T = 5
    env = proc.env_actions(chunk)
    assert env.shape == (2, 5, 7) and env.dtype == torch.float32
    torch.testing.assert_close(env[0, :, :6], lo[:6].expand(5, 6))
    torch.testing.assert_close(env[1, :, :6], hi[:6].expand(5, 6))
    assert env[0, :, 6].tolist() == [-1.0] * 5 and env[1, :, 6].tolist() == [1.0] * 5   # gripper: sign
    # mid-range: (y + 1) / 2 * (max - min) + min
    chunk = torch.full((1, 16, 32), 0.5)
    torch.testing.assert_close(proc.unnormalize_actions(chunk)[0, 0], 0.75 * (hi - lo) + lo)
    # and normalize_actions inverts it, with a mask of the real dims
    norm, mask = proc.normalize_actions(proc.unnormalize_actions(chunk))
    torch.testing.assert_close(norm[..., :7], chunk[..., :7])
    assert mask[..., :7].all() and not mask[..., 7:].any() and (norm[..., 7:] == 0).all()


def test_gripper_postprocessing_modes():
    a = torch.tensor([[[0.1, -0.3], [0.1, 0.2], [0.1, 0.9]]])
    assert postprocess_gripper(a, "sign")[0, :, 1].tolist() == [-1.0, 1.0, 1.0]
    assert postprocess_gripper(a, "libero")[0, :, 1].tolist() == [1.0, 1.0, -1.0]   # 1 - 2g, then sign
    assert torch.equal(postprocess_gripper(a, "none"), a)
    assert (postprocess_gripper(a, "sign")[..., 0] == 0.1).all()
