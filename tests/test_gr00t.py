"""GR00T N1.5 policy (CPU, the gr00t-tiny preset): checkpoint layout, Flow-SDE log-probs, determinism, gradients."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.distributions import Normal

from models.gr00t import EMBODIMENT_SLOTS, Gr00tConfig, Gr00tModel, Gr00tPolicy, _build_skeleton
from models.gr00t_checkpoint import export_tensors, official_config, official_dtype
from tests.test_gr00t_processor import make_metadata

INSTRUCTION = "Stack the red block on the blue block, then stack the green block on the red block."


def make_obs(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"rgb": torch.randint(0, 256, (n, 2, 256, 256, 3), dtype=torch.uint8, generator=g),
            "state": torch.randn(n, 8, generator=g) * 0.3 + 0.1}


def make_policy(**overrides) -> Gr00tPolicy:
    return Gr00tPolicy(Gr00tConfig.preset("gr00t-tiny", **overrides), metadata=make_metadata())


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def policy():
    return make_policy()


@pytest.fixture(scope="module")
def params(policy):
    return policy.init(seed=0)


@pytest.fixture(scope="module")
def obs():
    return make_obs()


@pytest.fixture(scope="module")
def out(policy, params, obs):
    return policy.sample(params, obs, INSTRUCTION, gen(3))


def reference_model(policy, params) -> Gr00tModel:
    """A plain module holding the params: an independent path through the same layers."""
    model = Gr00tModel(policy.cfg)
    model.load_state_dict({k: v.detach() for k, v in params.items()}, strict=True)
    return model


# -- checkpoint layout -------------------------------------------------------------------------------------------
def test_official_key_names_and_shapes():
    cfg = Gr00tConfig.preset("gr00t-n1.5-3b")
    shapes = {n: tuple(p.shape) for n, p in _build_skeleton(cfg, torch.device("cpu")).named_parameters()}
    expected = {
        "backbone.eagle_model.vision_model.vision_model.embeddings.patch_embedding.weight": (1152, 3, 14, 14),
        "backbone.eagle_model.vision_model.vision_model.embeddings.position_embedding.weight": (256, 1152),
        "backbone.eagle_model.vision_model.vision_model.encoder.layers.26.self_attn.q_proj.weight": (1152, 1152),
        "backbone.eagle_model.vision_model.vision_model.encoder.layers.26.mlp.fc1.weight": (4304, 1152),
        "backbone.eagle_model.vision_model.vision_model.post_layernorm.weight": (1152,),
        "backbone.eagle_model.mlp1.0.weight": (2048, 1152),
        "backbone.eagle_model.mlp1.0.bias": (2048,),
        "backbone.eagle_model.language_model.model.embed_tokens.weight": (151680, 2048),
        "backbone.eagle_model.language_model.model.layers.11.self_attn.k_proj.weight": (1024, 2048),
        "backbone.eagle_model.language_model.model.layers.11.self_attn.q_norm.weight": (128,),
        "backbone.eagle_model.language_model.model.layers.11.mlp.down_proj.weight": (2048, 6144),
        "backbone.eagle_model.language_model.model.norm.weight": (2048,),
        "action_head.vlln.weight": (2048,),
        "action_head.vl_self_attention.transformer_blocks.3.attn1.to_q.weight": (2048, 2048),
        "action_head.vl_self_attention.transformer_blocks.3.norm1.weight": (2048,),
        "action_head.vl_self_attention.transformer_blocks.3.ff.net.0.proj.weight": (8192, 2048),
        "action_head.model.timestep_encoder.timestep_embedder.linear_1.weight": (1536, 256),
        "action_head.model.transformer_blocks.0.norm1.linear.weight": (3072, 1536),
        "action_head.model.transformer_blocks.0.attn1.to_k.weight": (1536, 2048),      # cross-attention
        "action_head.model.transformer_blocks.1.attn1.to_k.weight": (1536, 1536),      # self-attention
        "action_head.model.transformer_blocks.15.attn1.to_out.0.weight": (1536, 1536),
        "action_head.model.transformer_blocks.15.ff.net.2.weight": (1536, 6144),
        "action_head.model.proj_out_1.weight": (3072, 1536),
        "action_head.model.proj_out_2.weight": (1024, 1536),
        "action_head.state_encoder.layer1.W": (32, 64, 1024),
        "action_head.state_encoder.layer2.W": (32, 1024, 1536),
        "action_head.action_encoder.W1.W": (32, 32, 1536),
        "action_head.action_encoder.W2.W": (32, 3072, 1536),
        "action_head.action_encoder.W3.b": (32, 1536),
        "action_head.action_decoder.layer1.W": (32, 1024, 1024),
        "action_head.action_decoder.layer2.W": (32, 1024, 32),
        "action_head.future_tokens.weight": (32, 1536),
        "action_head.position_embedding.weight": (1024, 1536),
        "value_head.mlp.0.weight": (1024, 2048 + 1536),
        "value_head.mlp.6.weight": (1, 256),
    }
    for name, shape in expected.items():
        assert shapes.get(name) == shape, name
    assert not any(n.startswith("backbone.eagle_model.language_model.model.layers.12.") for n in shapes)
    # SigLIP's attention-pooling head: in the official checkpoint, never computed by GR00T
    head = {n: s for n, s in shapes.items() if n.startswith("backbone.eagle_model.vision_model.vision_model.head.")}
    assert len(head) == 11 and head["backbone.eagle_model.vision_model.vision_model.head.probe"] == (1, 1, 1152)
    assert not any("lm_head" in n or "eagle_linear" in n for n in shapes)
    assert not any("norm3.weight" in n for n in shapes if n.startswith("action_head.model."))  # DiT: no affine
    # per DiT block: norm1.linear, attn1.to_q / to_k / to_v / to_out.0, ff.net.0.proj, ff.net.2 (weight + bias)
    assert sum(1 for n in shapes if n.startswith("action_head.model.transformer_blocks.")) == 16 * 14
    prefixes = ("backbone.eagle_model.vision_model.vision_model.", "backbone.eagle_model.mlp1.",
                "backbone.eagle_model.language_model.model.", "action_head.", "value_head.")
    assert all(n.startswith(prefixes) for n in shapes)


def test_presets_and_config_errors():
    assert EMBODIMENT_SLOTS["new_embodiment"] == 31 and EMBODIMENT_SLOTS["isaaclab_franka"] == 31
    assert Gr00tConfig.preset("gr00t-n1.5-3b").slot == 31
    assert Gr00tConfig.preset("gr00t-tiny", embodiment_tag="gr1").slot == 24
    with pytest.raises(ValueError, match="unknown GR00T preset 'gr00t-huge'.*gr00t-tiny"):
        Gr00tConfig.preset("gr00t-huge")
    with pytest.raises(ValueError, match="unknown embodiment tag 'robot_x'"):
        Gr00tConfig.preset("gr00t-tiny", embodiment_tag="robot_x")
    with pytest.raises(ValueError, match="executed_actions 17"):
        Gr00tConfig.preset("gr00t-tiny", executed_actions=17)


def rewrite_checkpoint(path, edit):
    """Load every tensor of a saved checkpoint, edit the dict, write it back as one shard + index."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensors = {}
    for f in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(path / f))
        (path / f).unlink()
    edit(tensors)
    save_file(tensors, path / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
    index["weight_map"] = dict.fromkeys(tensors, "model-00001-of-00001.safetensors")
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


OFFICIAL_LAYOUT = json.loads((Path(__file__).parent / "data" / "gr00t_n15_3b_official_layout.json").read_text())


def as_exported(params):
    """params as an export holds them: the backbone rounded to bf16 (then back to the param's dtype)."""
    return {n: t.detach().to(official_dtype(n)).to(t.dtype) if not n.startswith("value_head.") else t.detach()
            for n, t in params.items()}


def test_export_of_the_3b_model_has_exactly_the_official_tensors_and_config_keys():
    """The 3B model's export: the 898 official tensors (names, shapes, dtypes: backbone bf16, action head fp32), the
    value head apart, and config.json with exactly the official keys. Checked on the meta device (no memory)."""
    policy = Gr00tPolicy("gr00t-n1.5-3b")
    params = {n: torch.empty(s, device="meta") for n, s in policy.param_shapes.items()}
    model_tensors, rl_tensors = export_tensors(params)
    got = {n: [list(t.shape), str(t.dtype).removeprefix("torch.")] for n, t in model_tensors.items()}
    assert len(got) == OFFICIAL_LAYOUT["num_tensors"] == 898 and got == OFFICIAL_LAYOUT["tensors"]
    assert sorted(rl_tensors) == sorted(n for n in params if n.startswith("value_head.")) and len(rl_tensors) == 8

    def keys(d):
        return {k: keys(v) if isinstance(v, dict) else None for k, v in d.items()}

    config = official_config(policy.cfg)
    assert keys(config) == OFFICIAL_LAYOUT["config_keys"]
    assert config["transformers_version"] and config["backbone_cfg"]["select_layer"] == 12


def test_save_then_load_is_exact_in_the_official_layout(tmp_path):
    """An export holds the official tensors in the official dtypes and leanvla's value head apart; loading it gives
    the exported values bit for bit, and exporting those again writes the same tensors."""
    policy = make_policy()
    policy.max_shard_bytes = 200_000                       # force several shards
    params = policy.init(seed=1)
    with torch.no_grad():
        params["action_head.model.proj_out_2.bias"].add_(0.5)     # not just a fresh init
    policy.save(params, str(tmp_path / "ckpt"))
    policy.save(params, str(tmp_path / "ckpt"))            # overwriting an existing checkpoint is atomic too
    ckpt = tmp_path / "ckpt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]   # no temp dirs left behind
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((ckpt / s).exists() for s in shards)
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    official = {n for n in params if not n.startswith("value_head.")}
    assert set(index["weight_map"]) == official
    written = {}
    for s in shards:
        written.update(load_file(ckpt / s))
    assert all(t.dtype == (torch.bfloat16 if n.startswith("backbone.") else torch.float32) for n, t in written.items())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in written.values())
    assert set(load_file(ckpt / "leanvla_rl.safetensors")) == set(params) - official
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model_type"] == "gr00t_n1_5" and config["backbone_cfg"]["select_layer"] == 2
    assert config["action_head_cfg"]["diffusion_model_cfg"]["num_layers"] == 2 and "leanvla" not in config
    assert json.loads((ckpt / "leanvla_config.json").read_text())["dit_layers"] == 2
    assert json.loads((ckpt / "experiment_cfg" / "metadata.json").read_text()) == {"new_embodiment": make_metadata()}

    other = Gr00tPolicy(Gr00tConfig.preset("gr00t-tiny"))          # no metadata until loaded
    loaded = other.load(str(ckpt))
    exported = as_exported(params)
    assert list(loaded) == list(params)
    for name, t in exported.items():
        assert torch.equal(loaded[name], t), name
        assert loaded[name].dtype == t.dtype and loaded[name].requires_grad == params[name].requires_grad
    assert other.processor.metadata.entry == make_metadata()
    assert other.action_dim == 7 and other.action_horizon == 16
    out_a = policy.sample(exported, make_obs(), INSTRUCTION, gen(0))
    out_b = other.sample(loaded, make_obs(), INSTRUCTION, gen(0))
    assert torch.equal(out_a["actions"], out_b["actions"]) and torch.equal(out_a["logprob"], out_b["logprob"])

    policy2, params2 = Gr00tPolicy.from_pretrained(str(ckpt))       # the config comes from the checkpoint
    assert policy2.cfg == policy.cfg and all(torch.equal(params2[k], loaded[k]) for k in params)
    policy2.save(params2, str(tmp_path / "again"))                 # a round trip writes the same tensors
    again = {}
    for s in sorted(set(json.loads((tmp_path / "again" / "model.safetensors.index.json").read_text())
                        ["weight_map"].values())):
        again.update(load_file(tmp_path / "again" / s))
    assert again.keys() == written.keys() and all(torch.equal(again[n], written[n]) for n in written)


def test_an_export_with_leanvlas_config_inside_config_json_still_loads(tmp_path, policy, params):
    """Earlier exports kept the Gr00tConfig as config.json's `leanvla` section instead of leanvla_config.json."""
    ckpt = tmp_path / "ckpt"
    policy.save(params, str(ckpt))
    config = json.loads((ckpt / "config.json").read_text())
    config["leanvla"] = json.loads((ckpt / "leanvla_config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "leanvla_config.json").unlink()
    loaded_policy, _ = Gr00tPolicy.from_pretrained(str(ckpt))
    assert loaded_policy.cfg == policy.cfg


def test_both_official_dtype_layouts_load(tmp_path, policy, params):
    """A checkpoint with every tensor in fp32 (as RLinf's fine-tuned ones) and one in the official mixed dtypes
    load to the same params, up to the bf16 rounding of the backbone."""
    policy.save(params, str(tmp_path / "mixed"))
    policy.save(params, str(tmp_path / "fp32"))
    rewrite_checkpoint(tmp_path / "fp32", lambda t: t.update({n: v.float() for n, v in t.items()}))
    mixed, fp32 = make_policy().load(str(tmp_path / "mixed")), make_policy().load(str(tmp_path / "fp32"))
    assert all(torch.equal(mixed[n], fp32[n]) for n in params)


def test_load_rejects_missing_unexpected_and_misshapen_keys(tmp_path, policy, params):
    ckpt = tmp_path / "ckpt"
    policy.save(params, str(ckpt))
    missing = "action_head.model.transformer_blocks.1.attn1.to_v.bias"
    misshapen = "action_head.state_encoder.layer1.W"

    def corrupt(t):
        del t[missing]
        t[misshapen] = torch.zeros(3, 3)
        t["action_head.extra_layer.weight"] = torch.zeros(1)

    rewrite_checkpoint(ckpt, corrupt)
    with pytest.raises(ValueError) as err:
        make_policy().load(str(ckpt))
    msg = str(err.value)
    assert f"missing keys (1): {missing}" in msg
    assert "unexpected keys (1): action_head.extra_layer.weight" in msg
    assert f"{misshapen}: checkpoint (3, 3), model (32, 64, 32)" in msg


def test_load_takes_the_tied_lm_head_and_fills_what_official_checkpoints_lack(tmp_path, policy, params):
    """The tied LM head stands in for the token embedding; a checkpoint without leanvla's value head (every official
    one) or without SigLIP's unused pooling head gets a seeded one."""
    ckpt = tmp_path / "ckpt"
    policy.save(params, str(ckpt))
    (ckpt / "leanvla_rl.safetensors").unlink()
    embed = "backbone.eagle_model.language_model.model.embed_tokens.weight"
    siglip_head = "backbone.eagle_model.vision_model.vision_model.head."
    rewrite_checkpoint(ckpt, lambda t: t.update({"backbone.eagle_model.language_model.lm_head.weight": t.pop(embed)}))
    loaded = make_policy().load(str(ckpt))
    assert torch.equal(loaded[embed], as_exported(params)[embed])
    assert all(torch.equal(loaded[k], as_exported(params)[k]) for k in params if k.startswith(siglip_head))
    rewrite_checkpoint(ckpt, lambda t: [t.pop(k) for k in list(t) if k.startswith(siglip_head)])
    fresh, again = make_policy().load(str(ckpt)), make_policy().load(str(ckpt))    # the new heads are seeded
    assert all(torch.equal(fresh[k], again[k]) for k in fresh if k.startswith(("value_head.", siglip_head)))
    assert sum(k.startswith(siglip_head) for k in fresh) == 11 and not policy.is_trainable(siglip_head + "probe")


def test_load_renames_rlinf_value_head(tmp_path, policy, params):
    """RLinf keeps the value head in the model's shards, as action_head.value_head.*."""
    ckpt = tmp_path / "ckpt"
    policy.save(params, str(ckpt))
    value_head = load_file(ckpt / "leanvla_rl.safetensors")
    (ckpt / "leanvla_rl.safetensors").unlink()
    rewrite_checkpoint(ckpt, lambda t: t.update({"action_head." + k: v for k, v in value_head.items()}))
    loaded = make_policy().load(str(ckpt))
    assert all(torch.equal(loaded[k], params[k]) for k in params if k.startswith("value_head."))
    with pytest.raises(RuntimeError, match="cannot save without normalisation metadata"):
        Gr00tPolicy("gr00t-tiny").save(params, str(tmp_path / "other"))


def test_load_rejects_a_checkpoint_of_other_sizes(tmp_path, policy, params):
    policy.save(params, str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match="dit_layers: checkpoint 2, policy 4"):
        make_policy(dit_layers=4).load(str(tmp_path / "ckpt"))
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        make_policy().load(str(tmp_path / "nothing" / "here"))


def test_loading_from_the_hub_offline_fails_clearly(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"could not download 'nvidia/GR00T-N1.5-3B' from the Hugging Face hub"
                                           r" \(LocalEntryNotFoundError") as err:
        Gr00tPolicy("gr00t-tiny").load("nvidia/GR00T-N1.5-3B")
    assert isinstance(err.value.__cause__, huggingface_hub.errors.LocalEntryNotFoundError)


# -- backbone ----------------------------------------------------------------------------------------------------
def test_backbone_features_match_the_official_embedding_path(policy, params, obs, out):
    """Official Eagle forward: embed every token, overwrite the <IMG_CONTEXT> rows with the projected SigLIP
    features (input_embeds[selected] = vit), run the truncated LLM with the prompt's attention mask."""
    ref = reference_model(policy, params)
    eagle = ref.backbone.eagle_model
    proc = policy.processor
    ids, _ = proc.prompt(INSTRUCTION)
    n = obs["rgb"].shape[0]
    with torch.no_grad():
        vit = eagle.mlp1(eagle.vision_model.vision_model(proc.pixel_values(obs["rgb"])).last_hidden_state)
        batch_ids = ids.expand(n, -1)
        embeds = eagle.language_model.model.embed_tokens(batch_ids).reshape(-1, vit.shape[-1])
        selected = batch_ids.reshape(-1) == policy.cfg.image_token_id
        embeds[selected] = embeds[selected] * 0.0 + vit.reshape(-1, vit.shape[-1])
        features = eagle.language_model.model(inputs_embeds=embeds.reshape(n, -1, vit.shape[-1]),
                                              attention_mask=torch.ones_like(batch_ids)).last_hidden_state
    torch.testing.assert_close(out["backbone_features"], features, atol=1e-5, rtol=1e-5)
    assert out["backbone_mask"].all() and out["backbone_mask"].shape == features.shape[:2]


# -- acting ------------------------------------------------------------------------------------------------------
def test_sample_outputs(policy, out):
    n, c = 2, policy.cfg
    assert out["actions"].shape == (n, 16, 7) and out["actions"].dtype == torch.float32
    assert set(out["actions"][..., 6].unique().tolist()) <= {-1.0, 0.0, 1.0}        # gripper: sign
    assert out["logprob"].shape == (n,) and out["value"].shape == (n,)
    assert out["chain"].shape == (n, c.num_inference_steps + 1, 16, 32)
    assert out["sde_steps"].shape == (n, 1) and (out["sde_steps"] == out["sde_steps"][0]).all()
    assert out["state_norm"].shape == (n, 64)
    assert all(v.shape[0] == n for v in out.values())
    assert torch.isfinite(out["logprob"]).all() and torch.isfinite(out["value"]).all()
    expected = policy.processor.unnormalize_actions(out["chain"][:, -1])
    torch.testing.assert_close(out["actions"][..., :6], expected[..., :6])


def test_value_of_an_observation(policy, params, obs, out):
    torch.testing.assert_close(policy.value(params, obs, INSTRUCTION), out["value"], atol=1e-6, rtol=1e-5)


def velocity(ref, policy, out, x, timesteps):
    """The action head's velocity at discretised flow times [N], with K/V recomputed (as the official code does)."""
    head, c = ref.action_head, policy.cfg
    with torch.no_grad():
        vl = head.vl_self_attention(head.vlln(out["backbone_features"]))
        state_token = head.state_encoder(out["state_norm"][:, None], c.slot)
        a = head.action_encoder(x, timesteps, c.slot) + head.position_embedding(torch.arange(x.shape[1]))[None]
        tokens = torch.cat([state_token, head.future_tokens.weight.expand(x.shape[0], -1, -1), a], 1)
        hidden = head.model(tokens, timesteps, head.model.cross_kv(vl))
        return head.action_decoder(hidden, c.slot)[:, -x.shape[1]:]


def step_time(policy, k, n):
    """GR00T's discretised time of denoising step k: int(k / K * num_timestep_buckets)."""
    c = policy.cfg
    return torch.full((n,), int(k / c.num_inference_steps * c.num_timestep_buckets))


def rlinf_flow_sde(x, v, k, num_steps, noise_level):
    """RLinf's flow_sde step (GR00T convention: t from 0 = noise to 1 = action) for step index k."""
    timesteps = torch.linspace(0, 1, num_steps + 1)
    sigmas = noise_level * torch.sqrt((1 - timesteps) / torch.where(timesteps == 0, timesteps[1], timesteps))[:-1]
    t, dt, sigma = timesteps[k], timesteps[k + 1] - timesteps[k], sigmas[k]
    x0_pred, x1_pred = x - v * t, x + v * (1 - t)
    mean = x0_pred * (1 - (t + dt) - sigma**2 * dt / (2 * (1 - t))) + x1_pred * (t + dt)
    return mean, torch.sqrt(dt) * sigma


@pytest.mark.parametrize("sde_steps", ["one", "all"])
def test_logprob_equals_normal_over_the_stored_chain(sde_steps, params, obs):
    policy = make_policy(sde_steps=sde_steps, executed_actions=10)
    out = policy.sample(params, obs, INSTRUCTION, gen(7))
    ref, c, chain = reference_model(policy, params), policy.cfg, out["chain"]
    n, num_steps = chain.shape[0], c.num_inference_steps
    stochastic = out["sde_steps"][0].tolist()
    assert stochastic == (list(range(num_steps)) if sde_steps == "all" else stochastic[:1])
    expected = torch.zeros(n)
    for k in range(num_steps):
        x, x_next = chain[:, k], chain[:, k + 1]
        v = velocity(ref, policy, out, x, step_time(policy, k, n))
        if k in stochastic:
            mean, std = rlinf_flow_sde(x, v, k, num_steps, c.noise_level)
            lp = Normal(mean, std).log_prob(x_next)
            expected += lp[:, :10, :7].sum((1, 2))        # executed actions, valid action dims
        else:                                             # deterministic Euler step of the ODE
            torch.testing.assert_close(x_next, x + v / num_steps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["logprob"], expected, atol=1e-3, rtol=1e-5)


def test_one_instruction_per_row_acts_as_each_prompt_alone(policy, params):
    """Rows with different instructions are left-padded to the longest prompt and the padding is masked (in the LLM,
    the VL self-attention, the DiT's cross-attention and the value's pooling): each row gets what a batch of its
    own prompt gives (the same noise: same batch size and seed), within fp32 noise."""
    obs, short, long = make_obs(2), "lift", "stack the red block on the blue block"
    mixed = policy.sample(params, obs, [short, long], gen(3))
    alone = [policy.sample(params, obs, text, gen(3)) for text in (short, long)]
    mask = mixed["backbone_mask"]
    pad = mask.shape[1] - alone[0]["backbone_features"].shape[1]
    assert pad == len(long) - len(short) and mask.shape == (2, alone[1]["backbone_features"].shape[1])
    assert not mask[0, :pad].any() and mask[0, pad:].all() and mask[1].all()
    close = dict(atol=2e-5, rtol=1e-5)
    for row, ref in enumerate(alone):
        torch.testing.assert_close(mixed["backbone_features"][row, mask[row]], ref["backbone_features"][row], **close)
        for k in ("chain", "actions", "logprob", "value"):
            torch.testing.assert_close(mixed[k][row], ref[k][row], **close, msg=lambda m, k=k: f"{k}: {m}")
    assert torch.isfinite(mixed["backbone_features"]).all()      # padding tokens stay finite (they attend to self)
    logprob, value, _ = policy.evaluate(params, mixed)           # evaluate applies the stored mask
    torch.testing.assert_close(logprob, mixed["logprob"], **close)
    torch.testing.assert_close(value, mixed["value"], **close)
    torch.testing.assert_close(policy.value(params, obs, [short, long]), mixed["value"], **close)
    same = policy.sample(params, obs, [long, long], gen(3))      # equal strings: one prompt, no padding
    assert torch.equal(same["actions"], alone[1]["actions"]) and same["backbone_mask"].all()
    even = policy.sample(params, obs, ["lift", "grab"], gen(3))  # different prompts of one length: nothing padded
    lift, grab = (policy.sample(params, obs, text, gen(3)) for text in ("lift", "grab"))
    assert even["backbone_mask"].all()
    torch.testing.assert_close(even["actions"], torch.stack([lift["actions"][0], grab["actions"][1]]), **close)
    with pytest.raises(ValueError, match="got 3 instructions for a batch of 2 rows"):
        policy.sample(params, obs, ["a", "b", "c"], gen(0))


def test_evaluate_reproduces_sample_logprob(policy, params, out):
    logprob, value, entropy = policy.evaluate(params, out)
    assert torch.equal(logprob, out["logprob"]) and torch.equal(value, out["value"])
    assert entropy is None
    rows = {k: v[1:] for k, v in out.items()}                         # a minibatch of rows
    logprob, value, _ = policy.evaluate(params, rows)
    torch.testing.assert_close(logprob, out["logprob"][1:], atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(value, out["value"][1:], atol=1e-6, rtol=1e-5)


def test_evaluate_reproduces_all_step_logprob(params, obs):
    policy = make_policy(sde_steps="all")
    out = policy.sample(params, obs, INSTRUCTION, gen(11))
    assert torch.equal(policy.evaluate(params, out)[0], out["logprob"])
    # rows sampled in different calls (different stochastic steps) evaluated together
    one = make_policy()
    a, b = one.sample(params, obs, INSTRUCTION, gen(1)), one.sample(params, obs, INSTRUCTION, gen(2))
    both = {k: torch.cat([a[k], b[k]]) for k in a}
    torch.testing.assert_close(one.evaluate(params, both)[0], both["logprob"], atol=1e-4, rtol=1e-6)


def test_same_seed_same_actions(policy, params, obs, out):
    again = policy.sample(params, obs, INSTRUCTION, gen(3))
    for k in out:
        assert torch.equal(again[k], out[k]), k
    other = policy.sample(params, obs, INSTRUCTION, gen(4))
    assert not torch.equal(other["chain"], out["chain"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_random_init_is_the_same_on_every_device(params):
    """A run's checkpoints keep only trainable params and redraw the frozen ones from the seed where the run is
    resumed or evaluated, so a GPU run evaluated on the CPU (or another GPU model) must get the same weights."""
    on_gpu = Gr00tPolicy(Gr00tConfig.preset("gr00t-tiny"), "cuda", metadata=make_metadata(),
                         compute_dtype=torch.float32).init(seed=0)
    assert on_gpu.keys() == params.keys()
    for name, t in params.items():
        assert torch.equal(on_gpu[name].cpu(), t), name


def test_inference_params_act_like_the_params_in_the_compute_dtype(obs):
    policy = Gr00tPolicy(Gr00tConfig.preset("gr00t-tiny"), metadata=make_metadata(), compute_dtype=torch.bfloat16)
    params = policy.init(seed=0)
    act = policy.inference_params(params)
    assert act.keys() == params.keys() and {t.dtype for t in act.values()} == {torch.bfloat16}
    assert not any(t.requires_grad for t in act.values())
    assert params["action_head.model.proj_out_2.weight"].dtype == torch.float32  # the original is untouched
    ref = policy.sample(params, obs, INSTRUCTION, gen(5), deterministic=True)["actions"]
    got = policy.sample(act, obs, INSTRUCTION, gen(5), deterministic=True)["actions"]
    # the same model up to bf16 rounding of the weights that autocast used to round on every call
    torch.testing.assert_close(got, ref, atol=0.05, rtol=0.05)
    assert not torch.equal(got, ref)


def test_deterministic_mode_is_the_official_euler_ode(policy, params, obs):
    out = policy.sample(params, obs, INSTRUCTION, gen(5), deterministic=True)
    again = policy.sample(params, obs, INSTRUCTION, gen(5), deterministic=True)
    assert torch.equal(out["actions"], again["actions"])
    assert (out["logprob"] == 0).all() and (out["sde_steps"] == -1).all()
    assert torch.equal(policy.evaluate(params, out)[0], torch.zeros(2))
    # GR00T's get_action: actions = noise; for t in range(K): actions += dt * velocity(actions, int(t/K * 1000))
    c = policy.cfg
    noise = torch.randn((2, c.num_inference_steps + 1, 16, 32), generator=gen(5))
    ref = reference_model(policy, params)
    actions = noise[:, 0]
    for k in range(c.num_inference_steps):
        actions = actions + velocity(ref, policy, out, actions, step_time(policy, k, 2)) / c.num_inference_steps
    torch.testing.assert_close(out["chain"][:, -1], actions, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["actions"], policy.processor.env_actions(actions))


def test_sample_rejects_bad_observations(policy, params):
    bad = make_obs()
    bad["rgb"] = bad["rgb"][:, :, :200]
    with pytest.raises(ValueError, match="images are 200x256"):
        policy.sample(params, bad, INSTRUCTION, gen(0))
    with pytest.raises(RuntimeError, match="no normalisation metadata"):
        Gr00tPolicy("gr00t-tiny").sample(params, make_obs(), INSTRUCTION, gen(0))
    with pytest.raises(ValueError, match="metadata is for embodiment 'new_embodiment', the config for 'gr1'"):
        make_policy(embodiment_tag="gr1")


# -- training ----------------------------------------------------------------------------------------------------
def test_trainable_split_follows_the_official_flags(policy, params):
    trainable = {k for k in params if policy.is_trainable(k)}
    assert all(params[k].requires_grad == (k in trainable) for k in params)
    assert all(params[k].dtype == torch.float32 for k in params)
    assert not any(k.startswith("backbone.") for k in trainable)
    assert {k for k in params if k.startswith(("action_head.", "value_head."))} == trainable
    assert policy.is_value_param("value_head.mlp.0.weight") and not policy.is_value_param("action_head.vlln.weight")
    flags = make_policy(tune_visual=True, tune_llm=True, tune_projector=False, tune_diffusion_model=False)
    assert flags.is_trainable("backbone.eagle_model.mlp1.0.weight")
    assert flags.is_trainable("backbone.eagle_model.language_model.model.norm.weight")
    assert not flags.is_trainable("action_head.model.proj_out_2.weight")
    assert not flags.is_trainable("action_head.action_encoder.W1.W")
    assert flags.is_trainable("action_head.vl_self_attention.transformer_blocks.0.attn1.to_q.weight")


def test_gradients_reach_trainable_params_only(policy, params, out):
    def grads(loss):
        for p in params.values():
            p.grad = None
        loss.backward()
        return {k for k, p in params.items() if p.grad is not None and p.grad.abs().sum() > 0}

    logprob, value, _ = policy.evaluate(params, out)
    policy_grads = grads(-logprob.mean())
    trainable_head = {k for k in params if k.startswith("action_head.")}
    assert policy_grads == trainable_head
    logprob, value, _ = policy.evaluate(params, out)
    assert grads(value.square().mean()) == {k for k in params if k.startswith("value_head.")}  # detached input
    assert all(not params[k].requires_grad for k in params if k.startswith("backbone."))

    shared = make_policy(value_detach_input=False)
    logprob, value, _ = shared.evaluate(params, out)
    value_grads = grads(value.square().mean())
    assert "action_head.vl_self_attention.transformer_blocks.0.attn1.to_q.weight" in value_grads
    assert not any(k.startswith(("backbone.", "action_head.model.")) for k in value_grads)
    for p in params.values():
        p.grad = None


def test_sft_loss_trains_the_action_head(policy, params, obs, out):
    g = torch.Generator().manual_seed(0)
    demo = torch.rand(2, 16, 7, generator=g) * 2 - 1
    demo[..., 6] = torch.sign(demo[..., 6])
    batch = {"rgb": obs["rgb"], "state": obs["state"], "instruction": INSTRUCTION, "actions": demo}
    loss = policy.sft_loss(params, batch, gen(1))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert torch.equal(loss, policy.sft_loss(params, batch, gen(1)))                # seeded
    cached = {"backbone_features": out["backbone_features"], "backbone_mask": out["backbone_mask"],
              "state_norm": out["state_norm"], "actions": demo}
    torch.testing.assert_close(policy.sft_loss(params, cached, gen(1)), loss, atol=1e-5, rtol=1e-5)
    # GR00T's loss: noise ~ N(0, I), t = (s - Beta(1.5, 1)) / s, x_t = (1 - t) noise + t action,
    # MSE of the velocity against action - noise over the valid dims (the generator draws noise, then t)
    g = gen(1)
    target, mask = policy.processor.normalize_actions(demo)
    noise = torch.randn(target.shape, generator=g)
    beta = torch.rand(2, generator=g) ** (1 / 1.5)
    t = ((0.999 - beta) / 0.999)[:, None, None]
    v = velocity(reference_model(policy, params), policy, out, (1 - t) * noise + t * target,
                 (t[:, 0, 0] * 1000).long())
    expected = ((v - (target - noise)) ** 2 * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)

    trained = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in params.items()}
    opt = torch.optim.Adam([p for p in trained.values() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = policy.sft_loss(trained, cached, gen(2))                    # same noise and time each step
        loss.backward()
        assert all(trained[k].grad is None for k in trained if k.startswith(("backbone.", "value_head.")))
        assert all(trained[k].grad is not None for k in trained if k.startswith("action_head."))
        opt.step()
        losses.append(loss.item())
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0]


def test_cross_attention_kv_cast_the_vl_tokens_once(policy, params):
    """Under autocast the VL tokens (fp32 out of their LayerNorm) are cast to bf16 once for all cross-attention
    K/V projections, not once per projection; K/V equal those of the per-projection casts."""
    from torch.utils._python_dispatch import TorchDispatchMode

    dit = reference_model(policy, params).action_head.model
    vl = torch.randn(2, 7, policy.cfg.llm_hidden)

    class CastsOfVl(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].shape == vl.shape:
                CastsOfVl.count += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16), CastsOfVl():
        kv = dit.cross_kv(vl)
    cross = [pair for pair in kv if pair is not None]
    assert len(cross) == (policy.cfg.dit_layers + 1) // 2 and CastsOfVl.count == 1
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        for (k, v), blk in zip(cross, dit.transformer_blocks[::2]):
            assert k.dtype == v.dtype == torch.bfloat16
            torch.testing.assert_close((k, v), blk.attn1.kv(vl), rtol=0, atol=0)
