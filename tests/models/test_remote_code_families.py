"""Families whose hub checkpoints ship their own modeling code, streamed natively
(trust_remote_code=False, no checkpoint code runs), against the original code's outputs.

The oracle is ../shared/fixtures/remote-code (its README says how it was made): tiny checkpoints
of each family with the logits, cached decode-step logits and greedy ids that the original
upstream modeling code produced. Each is loaded from its original shards and from a `rabbit split`
of them; float32 logits must be within 1e-4 of the reference at every prompt position and every
cached decode step, and the greedy ids identical. Missing fixtures fail the tests (they are part
of the repository's shared data), they never skip them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from rabbit_engine.errors import WeightMismatchError
from rabbit_models.remote import ADAPTERS, RemoteConfigError, SequenceTooLongError
from rabbit_models.support import support_for
from rabbitllm import AutoModel

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "remote-code"
FAMILIES = ["internlm", "internlm2", "qwen", "baichuan", "chatglm", "baichuan_alibi"]
TOL = 1e-4

pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.* is deprecated:FutureWarning")


def fixture_dir(family: str) -> Path:
    path = FIXTURES / family
    if not (path / "config.json").is_file():
        pytest.fail(
            f"remote-code fixture {family!r} is missing at {path.resolve()}: these tests need the "
            "shared fixtures (../shared/fixtures/remote-code from the repository root)."
        )
    return path


def reference(family: str) -> dict[str, np.ndarray]:
    return dict(np.load(fixture_dir(family) / "reference.npz"))


@pytest.fixture(scope="module")
def split_dirs(tmp_path_factory) -> dict[str, Path]:
    """One `rabbit split` of each fixture, made on first use."""
    from rabbit_store import split_checkpoint

    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            dest = tmp_path_factory.mktemp(f"split-{family}")
            split_checkpoint(str(fixture_dir(family)), str(dest), progress=False)
            made[family] = dest
        return made[family]

    return get


def _check_against_reference(model, ref: dict[str, np.ndarray]) -> None:
    prompt = torch.from_numpy(ref["input_ids"]).long()
    greedy = ref["greedy"].tolist()
    with torch.no_grad():
        # prompt forward, no cache: every position
        logits = model(prompt, use_cache=False).logits[0].float().numpy()
        np.testing.assert_allclose(logits, ref["prompt_logits"], rtol=0, atol=TOL)
        # prefill + cached single-token decode steps, fed the reference's greedy ids
        cache = DynamicCache()
        out = model(prompt, past_key_values=cache, use_cache=True)
        steps = [out.logits[0, -1]]
        for token in greedy[:-1]:
            out = model(
                torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True
            )
            steps.append(out.logits[0, -1])
        decode = torch.stack(steps).float().numpy()
        np.testing.assert_allclose(decode, ref["decode_logits_last"], rtol=0, atol=TOL)
        assert decode.argmax(-1).tolist() == greedy
        # no cache over prompt + greedy ids
        full = model(torch.from_numpy(ref["nocache_input_ids"]).long(), use_cache=False)
        np.testing.assert_allclose(
            full.logits[0].float().numpy(), ref["nocache_logits"], rtol=0, atol=TOL
        )
        # transformers' own generate() on the streamed model
        gen = model.generate(
            prompt,
            max_new_tokens=len(greedy),
            min_new_tokens=len(greedy),  # no early stop on eos (the reference disabled it)
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert gen.sequences[0, prompt.shape[1] :].tolist() == greedy
    gen_logits = torch.stack(gen.logits)[:, 0].float().numpy()
    np.testing.assert_allclose(gen_logits, ref["decode_logits_last"], rtol=0, atol=TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_the_original_code_from_its_shards(family):
    path = fixture_dir(family)
    with AutoModel.from_pretrained(path, dtype=torch.float32) as model:
        # transformers' own class, built from the translated config of this family
        assert any(c.__module__.startswith("transformers.models.") for c in type(model).__mro__)
        assert model.config.rabbit_remote_family == family
        _check_against_reference(model, reference(family))


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_the_original_code_from_a_split(family, split_dirs):
    path = fixture_dir(family)
    with AutoModel.from_pretrained(path, layers_path=split_dirs(family), dtype=torch.float32) as m:
        _check_against_reference(m, reference(family))


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_stays_near_the_reference(family):
    """Real checkpoints are bf16: the translation holds there too (the conversions keep the
    dtype, ALiBi's growing bias is added in float32); bf16 rounding moves these logits ~0.04."""
    ref = reference(family)
    with AutoModel.from_pretrained(fixture_dir(family), dtype=torch.bfloat16) as model:
        with torch.no_grad():
            logits = model(torch.from_numpy(ref["nocache_input_ids"]).long()).logits
    assert logits.dtype == torch.bfloat16
    np.testing.assert_allclose(logits[0].float().numpy(), ref["nocache_logits"], rtol=0, atol=0.15)


@pytest.mark.parametrize("family", FAMILIES)
def test_support_table_names_the_adapter(family):
    model_type = json.loads((fixture_dir(family) / "config.json").read_text())["model_type"]
    row = support_for(model_type)
    assert row is not None and row.supported and row.adapter, row
    assert family in ADAPTERS


def test_support_rows_are_the_adapted_types():
    from rabbit_models.remote import MODEL_TYPES
    from rabbit_models.support import REMOTE_SUPPORT, SUPPORT

    assert set(REMOTE_SUPPORT) == MODEL_TYPES
    assert not MODEL_TYPES & set(SUPPORT)  # one row per type, in one of the two tables


# ---- bad input --------------------------------------------------------------------------------

# a field each family's translation cannot do without (baichuan's max_position_embeddings is what
# tells RoPE from ALiBi, so its RoPE row drops another)
_NEEDED = {
    "internlm": "max_position_embeddings",
    "internlm2": "num_attention_heads",
    "qwen": "seq_length",
    "baichuan": "intermediate_size",
    "chatglm": "multi_query_group_num",
    "baichuan_alibi": "model_max_length",
}
# a tensor of each family, by the key its checkpoint stores it under
_TENSOR = {
    "internlm": "model.layers.1.self_attn.k_proj.bias",
    "internlm2": "model.layers.1.attention.wqkv.weight",
    "qwen": "transformer.h.1.attn.c_attn.bias",
    "baichuan": "model.layers.1.self_attn.W_pack.weight",
    "chatglm": "transformer.encoder.layers.1.self_attention.query_key_value.weight",
    "baichuan_alibi": "model.layers.0.mlp.up_proj.weight",
}


def _copy_with(family: str, dest: Path, *, config=None, tensors=None) -> Path:
    """The fixture with its config.json or tensors changed (the weights linked when unchanged)."""
    from safetensors.torch import load_file, save_file

    src = fixture_dir(family)
    dest.mkdir()
    data = json.loads((src / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps(config(data) if config else data))
    if tensors is None:
        (dest / "model.safetensors").symlink_to((src / "model.safetensors").resolve())
    else:
        state = tensors(load_file(src / "model.safetensors"))
        save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.mark.parametrize("family", FAMILIES)
def test_config_lacking_a_needed_field_names_it(family, tmp_path):
    field = _NEEDED[family]

    def drop(data):
        assert field in data
        data.pop(field)
        return data

    path = _copy_with(family, tmp_path / "ckpt", config=drop)
    with pytest.raises(RemoteConfigError, match=repr(field)) as info:
        AutoModel.from_pretrained(path, dtype=torch.float32)
    assert info.value.field == field


@pytest.mark.parametrize("family", FAMILIES)
def test_tensor_of_the_wrong_shape_is_named(family, tmp_path):
    key = _TENSOR[family]

    def truncate(state):
        state[key] = state[key][:-1].clone()
        return state

    path = _copy_with(family, tmp_path / "ckpt", tensors=truncate)
    with pytest.raises(WeightMismatchError, match=repr(key)):
        AutoModel.from_pretrained(path, dtype=torch.float32)


def test_qwen_past_seq_length_is_refused(tmp_path):
    """QWen's dynamic NTK and logN scaling start past seq_length: refused there, not ignored."""

    def short(data):
        data["seq_length"] = 8
        return data

    path = _copy_with("qwen", tmp_path / "ckpt", config=short)
    ids = torch.from_numpy(reference("qwen")["nocache_input_ids"]).long()
    with AutoModel.from_pretrained(path, dtype=torch.float32) as model, torch.no_grad():
        model(ids[:, :8])  # up to seq_length: fine
        with pytest.raises(SequenceTooLongError, match="9 tokens is past 8"):
            model(ids[:, :9])


def test_chatglm_rejects_a_variant_no_release_uses(tmp_path):
    def layernorm(data):
        data["rmsnorm"] = False
        return data

    path = _copy_with("chatglm", tmp_path / "ckpt", config=layernorm)
    with pytest.raises(RemoteConfigError, match="rmsnorm=False") as info:
        AutoModel.from_pretrained(path, dtype=torch.float32)
    assert info.value.field == "rmsnorm"


def test_trust_remote_code_still_means_the_checkpoints_own_code(tmp_path):
    """With trust_remote_code=True the translation is not used: the checkpoint's code is asked
    for, and these fixtures ship none."""
    path = _copy_with("internlm", tmp_path / "ckpt")
    with pytest.raises(Exception) as info:  # noqa: B017 - transformers' own error for missing code
        AutoModel.from_pretrained(path, dtype=torch.float32, trust_remote_code=True)
    assert "configuration_internlm" in str(info.value)


# ---- variants beyond the fixtures, against transformers' own model of the same function --------


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights as the fixtures have them (attention far from uniform, no trivial norms/biases)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "norm" in name:
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=gen))
            elif name.endswith("bias"):
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
            elif "embed" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
            else:
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5)
    return model.eval()


def _save(path: Path, config: dict, state: dict[str, torch.Tensor], shards: int = 1) -> Path:
    """A checkpoint as the family's own save_pretrained lays it out (config.json, shards)."""
    from safetensors.torch import save_file

    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    keys = list(state)
    if shards == 1:
        save_file({k: state[k].contiguous() for k in keys}, path / "model.safetensors")
        return path
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: state[k].contiguous() for k in part}, path / name)
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


def _common(layers: int = 2) -> dict:
    return dict(vocab_size=256, hidden_size=96, intermediate_size=128, num_hidden_layers=layers)


def _internlm2(nh: int, nkv: int, bias: bool, linear: float | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    hd = 96 // nh
    scaling = {"rope_scaling": {"rope_type": "linear", "factor": linear}} if linear else {}
    ref = LlamaConfig(
        **scaling,
        **_common(),
        num_attention_heads=nh,
        num_key_value_heads=nkv,
        head_dim=hd,
        rope_theta=500000.0,
        attention_bias=bias,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    model = _randomize(LlamaForCausalLM(ref), seed=nh * 10 + nkv)
    sd, out, g = model.state_dict(), {}, nh // nkv
    for key, value in sd.items():
        if ".self_attn.q_proj." in key:
            suffix = key.rsplit(".", 1)[1]
            pre = key.split(".self_attn.")[0]
            q, k, v = (sd[f"{pre}.self_attn.{p}_proj.{suffix}"] for p in "qkv")
            rest = q.shape[1:]
            blocks = torch.cat(
                [
                    q.view(nkv, g, hd, *rest),
                    k.view(nkv, 1, hd, *rest),
                    v.view(nkv, 1, hd, *rest),
                ],
                dim=1,
            )
            out[f"{pre}.attention.wqkv.{suffix}"] = blocks.reshape(-1, *rest)
        elif ".self_attn.k_proj." in key or ".self_attn.v_proj." in key:
            continue
        else:
            new = key
            for a, b in [
                ("embed_tokens", "tok_embeddings"),
                ("input_layernorm", "attention_norm"),
                ("self_attn.o_proj", "attention.wo"),
                ("post_attention_layernorm", "ffn_norm"),
                ("mlp.gate_proj", "feed_forward.w1"),
                ("mlp.up_proj", "feed_forward.w3"),
                ("mlp.down_proj", "feed_forward.w2"),
                ("lm_head", "output"),
            ]:
                new = new.replace(a, b)
            out[new] = value
    config = dict(
        model_type="internlm2",
        auto_map={"AutoConfig": "configuration_internlm2.InternLM2Config"},
        **_common(),
        num_attention_heads=nh,
        num_key_value_heads=nkv,
        rope_theta=500000,
        bias=bias,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
        rope_scaling={"type": "linear", "factor": linear} if linear else None,
        tie_word_embeddings=False,
    )
    return model, config, out


def _qwen(nh: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    ref = Qwen2Config(
        **_common(),
        num_attention_heads=nh,
        num_key_value_heads=nh,
        rope_theta=20000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    model = _randomize(Qwen2ForCausalLM(ref), seed=nh)
    sd, out = model.state_dict(), {}
    names = [
        ("model.embed_tokens", "transformer.wte"),
        ("model.norm", "transformer.ln_f"),
        ("model.layers", "transformer.h"),
        ("input_layernorm", "ln_1"),
        ("post_attention_layernorm", "ln_2"),
        ("self_attn.o_proj", "attn.c_proj"),
        ("mlp.gate_proj", "mlp.w2"),
        ("mlp.up_proj", "mlp.w1"),
        ("mlp.down_proj", "mlp.c_proj"),
    ]
    for key, value in sd.items():
        new = key
        for a, b in names:
            new = new.replace(a, b)
        if ".self_attn.q_proj." in key:
            suffix = key.rsplit(".", 1)[1]
            pre = key.split(".self_attn.")[0]
            fused = torch.cat([sd[f"{pre}.self_attn.{p}_proj.{suffix}"] for p in "qkv"])
            out[new.replace("self_attn.q_proj", "attn.c_attn")] = fused
        elif ".self_attn.k_proj." not in key and ".self_attn.v_proj." not in key:
            out[new] = value
    common = _common()
    common["intermediate_size"] *= 2  # QWen's config counts both halves of the MLP
    config = dict(
        model_type="qwen",
        **common,
        num_attention_heads=nh,
        kv_channels=96 // nh,
        rotary_emb_base=20000,
        layer_norm_epsilon=1e-6,
        seq_length=2048,
        no_bias=True,
        use_dynamic_ntk=True,
        use_logn_attn=True,
        tie_word_embeddings=False,
    )
    return model, config, out


def _chatglm(nh: int, groups: int, rope_ratio: float = 1.0):
    from transformers import GlmConfig, GlmForCausalLM

    ref = GlmConfig(
        rope_theta=10000.0 * rope_ratio,
        **_common(),
        num_attention_heads=nh,
        num_key_value_heads=groups,
        head_dim=96 // nh,
        partial_rotary_factor=0.5,
        rms_norm_eps=1e-5,
        attention_bias=True,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = _randomize(GlmForCausalLM(ref), seed=nh + groups)
    sd, out = model.state_dict(), {}
    names = [
        ("model.embed_tokens", "transformer.embedding.word_embeddings"),
        ("model.norm", "transformer.encoder.final_layernorm"),
        ("model.layers", "transformer.encoder.layers"),
        ("lm_head", "transformer.output_layer"),
        ("self_attn.o_proj", "self_attention.dense"),
        ("mlp.gate_up_proj", "mlp.dense_h_to_4h"),
        ("mlp.down_proj", "mlp.dense_4h_to_h"),
    ]
    for key, value in sd.items():
        new = key
        for a, b in names:
            new = new.replace(a, b)
        if ".self_attn.q_proj." in key:
            suffix = key.rsplit(".", 1)[1]
            pre = key.split(".self_attn.")[0]
            fused = torch.cat([sd[f"{pre}.self_attn.{p}_proj.{suffix}"] for p in "qkv"])
            out[new.replace("self_attn.q_proj", "self_attention.query_key_value")] = fused
        elif ".self_attn.k_proj." not in key and ".self_attn.v_proj." not in key:
            out[new] = value
    common = _common()
    config = dict(
        model_type="chatglm",
        padded_vocab_size=common.pop("vocab_size"),
        hidden_size=common["hidden_size"],
        ffn_hidden_size=common["intermediate_size"],
        num_layers=common["num_hidden_layers"],
        num_attention_heads=nh,
        kv_channels=96 // nh,
        multi_query_attention=True,
        multi_query_group_num=groups,
        add_qkv_bias=True,
        add_bias_linear=False,
        layernorm_epsilon=1e-5,
        rmsnorm=True,
        post_layer_norm=True,
        seq_length=8192,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    if rope_ratio != 1.0:  # the 32k/128k checkpoints' later code: base 10000 * rope_ratio
        config["rope_ratio"] = rope_ratio
    return model, config, out


def _baichuan(nh: int, baichuan2: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    ref = LlamaConfig(
        **_common(),
        num_attention_heads=nh,
        num_key_value_heads=nh,
        head_dim=96 // nh,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    model = _randomize(LlamaForCausalLM(ref), seed=nh + baichuan2)
    sd, out = model.state_dict(), {}
    with torch.no_grad():  # raw rows of different norms in the checkpoint
        scale = torch.exp(torch.rand(256, 1, generator=torch.Generator().manual_seed(3)) * 2 - 1)
        raw_head = sd["lm_head.weight"] * scale
        if baichuan2:  # what the NormHead computes with: the normalised rows
            model.lm_head.weight.copy_(torch.nn.functional.normalize(raw_head, dim=1))
        else:
            model.lm_head.weight.copy_(raw_head)
    for key, value in sd.items():
        if ".self_attn.q_proj." in key:
            pre = key.split(".self_attn.")[0]
            fused = torch.cat([sd[f"{pre}.self_attn.{p}_proj.weight"] for p in "qkv"])
            out[f"{pre}.self_attn.W_pack.weight"] = fused
        elif ".self_attn.k_proj." not in key and ".self_attn.v_proj." not in key:
            out[key] = value
    out["lm_head.weight"] = raw_head
    config = dict(
        model_type="baichuan",
        **_common(),
        num_attention_heads=nh,
        max_position_embeddings=4096,
        model_max_length=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    if baichuan2:
        config["z_loss_weight"] = 0
    return model, config, out


def _internlm(nh: int, bias: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    ref = LlamaConfig(
        **_common(),
        num_attention_heads=nh,
        num_key_value_heads=nh,
        head_dim=96 // nh,
        rope_theta=10000.0,
        attention_bias=bias,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    model = _randomize(LlamaForCausalLM(ref), seed=nh + bias)
    config = dict(
        model_type="internlm",
        **_common(),
        num_attention_heads=nh,
        num_key_value_heads=2,  # internlm-20b's config has it; the original code ignores it
        rope_theta=1000000,  # ignored as well: the base is 10000
        bias=bias,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    return model, config, dict(model.state_dict())


VARIANTS = {
    "internlm2-6h-2kv-bias": lambda: _internlm2(6, 2, True),
    "internlm2-4h-mqa": lambda: _internlm2(4, 1, False),
    "internlm2-linear-rope": lambda: _internlm2(4, 2, False, linear=2.0),
    "internlm-8h-nobias": lambda: _internlm(8, False),
    "qwen-2h": lambda: _qwen(2),
    "chatglm-6h-3groups": lambda: _chatglm(6, 3),
    "chatglm-4h-mqa": lambda: _chatglm(4, 1),
    "chatglm-rope-ratio": lambda: _chatglm(4, 2, rope_ratio=50.0),
    "baichuan2-8h": lambda: _baichuan(8, True),
    "baichuan1-6h": lambda: _baichuan(6, False),
}


@pytest.mark.parametrize("shards", [1, 3], ids=["single", "sharded"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_matches_transformers(variant, shards, tmp_path):
    """Other head counts, KV groups, rope bases and biases, built from a transformers model of
    the same function and saved in the family's own layout: the streamed logits and greedy ids
    equal transformers' own."""
    model, config, state = VARIANTS[variant]()
    path = _save(tmp_path / "ckpt", config, state, shards=shards)
    prompt = torch.randint(3, 256, (1, 11), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = model(prompt).logits
        greedy = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with AutoModel.from_pretrained(path, dtype=torch.float32) as streamed, torch.no_grad():
        torch.testing.assert_close(streamed(prompt).logits, expected, rtol=0, atol=TOL)
        got = streamed.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert got.tolist() == greedy.tolist()


def test_alibi_slopes_follow_baichuans_interleave():
    """Power of 2: (2^(-8/n))^(h+1); otherwise slopes(c) then every other slope of 2c (c the power
    of 2 below n); the 6-head case exercises the second branch, like the real 40-head 13B."""
    from rabbit_models.remote.baichuan import alibi_slopes

    assert alibi_slopes(4).tolist() == [2**-2, 2**-4, 2**-6, 2**-8]
    assert alibi_slopes(6).tolist() == [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]
    real = alibi_slopes(40).double()
    power = torch.tensor([(2 ** (-8 / 32)) ** (h + 1) for h in range(32)], dtype=torch.float64)
    twice = torch.tensor([(2 ** (-8 / 64)) ** (h + 1) for h in range(64)], dtype=torch.float64)
    torch.testing.assert_close(real, torch.cat([power, twice[0::2][:8]]), rtol=1e-6, atol=0)


def test_alibi_six_heads_matches_a_plain_torch_reference(tmp_path):
    """Baichuan2-13B's block with 6 heads (the non-power-of-2 slopes), against the computation
    the fixture README describes, written out in plain torch."""
    from rabbit_models.remote.baichuan import alibi_slopes

    model, config, state = _baichuan(6, True)
    config.pop("max_position_embeddings")  # an ALiBi config has only model_max_length
    path = _save(tmp_path / "ckpt", config, state)
    sd = {k: v.double() for k, v in state.items()}
    nh, hd, n = 6, 16, 11

    def rms(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def reference(ids):
        x = sd["model.embed_tokens.weight"][ids[0]]
        t = x.shape[0]
        slopes = alibi_slopes(nh).double()
        bias = slopes[:, None, None] * torch.arange(t).double()[None, None, :]
        bias = bias + torch.full((t, t), float("-inf")).triu(1)
        for i in range(2):
            p = f"model.layers.{i}."
            h = rms(x, sd[p + "input_layernorm.weight"])
            q, k, v = (h @ sd[p + "self_attn.W_pack.weight"].T).split(96, dim=-1)
            q, k, v = (z.view(t, nh, hd).transpose(0, 1) for z in (q, k, v))
            att = torch.softmax(q @ k.transpose(1, 2) / hd**0.5 + bias, dim=-1) @ v
            x = x + att.transpose(0, 1).reshape(t, 96) @ sd[p + "self_attn.o_proj.weight"].T
            h = rms(x, sd[p + "post_attention_layernorm.weight"])
            gate = torch.nn.functional.silu(h @ sd[p + "mlp.gate_proj.weight"].T)
            x = x + (gate * (h @ sd[p + "mlp.up_proj.weight"].T)) @ sd[p + "mlp.down_proj.weight"].T
        head = torch.nn.functional.normalize(sd["lm_head.weight"], dim=1)
        return rms(x, sd["model.norm.weight"]) @ head.T

    prompt = torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(5))
    with AutoModel.from_pretrained(path, dtype=torch.float32) as streamed, torch.no_grad():
        logits = streamed(prompt).logits[0].double()
        torch.testing.assert_close(logits, reference(prompt), rtol=0, atol=TOL)
        # cached decode of the greedy continuation equals recomputing it
        out = streamed.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        full = reference(out)
    assert out[0, n:].tolist() == full[n - 1 : -1].argmax(-1).tolist()
