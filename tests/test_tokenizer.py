"Parity, meta-device shape, strict-loading and RoPE-dtype tests of the VTP tokenizer (`vtp_nbdev.tokenizer`)."
import ast, json, math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vtp_nbdev.tokenizer import (VTPConfig, VTPModel, VTPPretrainModel, StateDictMismatchError, HF_CONFIG_KEYS,
                                 VTP_PRESETS, count_params, ema_update, make_teacher, vtp_config)

FIX = Path(__file__).parent/'fixtures'/'official'        # written by the official implementation, kept with the project
TINY = FIX/'vtp_official_tiny_a'


def test_fixtures_present():
    "The official fixtures are part of the repository: a missing file fails, never skips."
    for f in ('vtp_large_config.json', 'vtp_large_state_dict_keys.tsv', 'vtp_official_tiny_a/config.json',
              'vtp_official_tiny_a/model.safetensors', 'vtp_official_tiny_a/inputs.safetensors',
              'vtp_official_tiny_a/outputs.safetensors'):
        assert (FIX/f).is_file(), f"official fixture {FIX/f} is missing (restore tests/fixtures/official from git)"


def fixture_outputs(model, image, text):
    "Every output stored in the official fixture, computed by `model` (see tests/fixtures/official/README.md)."
    with torch.no_grad():
        lat = model.get_reconstruction_latents(image)
        last = model.get_last_layer_feature(image)
        (p2, c2), (p1, c1) = model.get_intermediate_layers_feature(image, n=2, return_class_token=True)
        return dict(latents=lat, decoded=model.get_latents_decoded_images(lat),
                    clip_image=model.get_clip_image_feature(image, normalize=True),
                    clip_text=model.get_clip_text_feature(text, normalize=True),
                    last_cls=last['cls_token'], last_patch=last['patch_tokens'],
                    inter_m2_patch=p2, inter_m2_cls=c2, inter_m1_patch=p1, inter_m1_cls=c1,
                    logit_scale=model.logit_scale.detach().reshape(1))


@pytest.fixture(scope='module')
def tiny_io():
    return load_file(TINY/'inputs.safetensors'), load_file(TINY/'outputs.safetensors')


# ---------------------------------------------------------------- 1. parity with the official implementation
def test_parity_official_tiny(tiny_io):
    inp, ref = tiny_io
    model = VTPModel.from_pretrained(TINY, rope_dtype='bf16')
    out = fixture_outputs(model, inp['image'], inp['text'])
    assert set(out) == set(ref)
    for k, r in ref.items():
        assert out[k].shape == r.shape, k
        torch.testing.assert_close(out[k], r, atol=1e-5, rtol=0, msg=lambda m: f"{k}: {m}")


def test_official_config_fields():
    d = json.loads((TINY/'config.json').read_text())
    cfg = VTPConfig.from_dict(d)
    assert {k: v for k, v in d.items() if k not in HF_CONFIG_KEYS} == {k: v for k, v in cfg.to_dict().items() if k in d}
    assert VTPModel.from_pretrained(TINY).config.rope_dtype == 'bf16'   # official numerics by default


# ---------------------------------------------------------------- 2. paper scale on the meta device
def _key_table(path, depths):
    out = {}
    for line in Path(path).read_text().splitlines():
        k, shape, dt = line.split('\t')
        for i in range(depths[k.split('.')[0]] if '{i}' in k else 1):
            out[k.replace('{i}', str(i))] = (ast.literal_eval(shape), dt)
    return out


def test_paper_L_meta_keys_shapes_dtypes():
    with torch.device('meta'): model = VTPModel(vtp_config('paper_L'))
    want = _key_table(FIX/'vtp_large_state_dict_keys.tsv', dict(trunk=24, pixel_decoder=24, text_transformer=12))
    got = {k: (tuple(v.shape), str(v.dtype).removeprefix('torch.')) for k, v in model.state_dict().items()}
    assert sorted(got.keys() - want.keys()) == [] and sorted(want.keys() - got.keys()) == []
    assert {k: v for k, v in got.items() if want[k] != v} == {}
    assert round(count_params(model) / 1e6, 1) == 731.6
    assert round(count_params(model.trunk) / 1e6, 1) == 303.5 and round(count_params(model.pixel_decoder) / 1e6, 1) == 303.6


def test_paper_L_config_matches_release():
    large = json.loads((FIX/'vtp_large_config.json').read_text())
    cfg = vtp_config('paper_L').to_dict()
    assert {k: v for k, v in large.items() if k not in HF_CONFIG_KEYS} == {k: cfg[k] for k in large if k not in HF_CONFIG_KEYS}


@pytest.mark.parametrize('name,trunk_m,total_m', [('paper_S', (20, 24), (150, 190)), ('paper_B', (84, 88), (280, 310))])
def test_paper_S_B_param_counts(name, trunk_m, total_m):
    with torch.device('meta'): model = VTPModel(vtp_config(name))
    t, n = count_params(model.trunk) / 1e6, count_params(model) / 1e6
    assert trunk_m[0] < t < trunk_m[1] and total_m[0] < n < total_m[1], (t, n)
    assert abs(count_params(model.pixel_decoder) / 1e6 - t) < 0.1        # symmetric decoder
    assert model.get_reconstruction_latents(torch.empty(1, 3, 256, 256, device='meta')).shape == (1, 64, 16, 16)


def test_cpu_presets_grow():
    with torch.device('meta'): p = [count_params(VTPModel(vtp_config(n)).trunk) for n in ('tiny', 'S', 'B', 'L')]
    assert all(b > 2 * a for a, b in zip(p, p[1:]))
    assert set(VTP_PRESETS) >= {'tiny', 'S', 'B', 'L', 'paper_S', 'paper_B', 'paper_L'}


# ---------------------------------------------------------------- 3. strict loading and round trip
@pytest.fixture(scope='module')
def tiny_model():
    torch.manual_seed(0)
    return VTPModel(vtp_config('tiny', num_registers=2)).eval()


def test_roundtrip_exact(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path/'ckpt')
    assert sorted(p.name for p in (tmp_path/'ckpt').iterdir()) == ['config.json', 'model.safetensors']  # no temp files left
    m2 = VTPModel.from_pretrained(tmp_path/'ckpt')
    assert m2.config == tiny_model.config
    img, txt = torch.randn(2, 3, 32, 32), torch.randint(1, 49000, (2, 32))
    a, b = fixture_outputs(tiny_model, img, txt), fixture_outputs(m2, img, txt)
    for k in a: assert torch.equal(a[k], b[k]), k
    sd1, sd2 = tiny_model.state_dict(), m2.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) and sd1[k].dtype == sd2[k].dtype for k in sd1)


def test_official_roundtrip(tmp_path, tiny_io):
    inp, ref = tiny_io
    VTPModel.from_pretrained(TINY).save_pretrained(tmp_path)
    out = fixture_outputs(VTPModel.from_pretrained(tmp_path), inp['image'], inp['text'])
    for k in ref: torch.testing.assert_close(out[k], ref[k], atol=1e-5, rtol=0)


def _write(folder, cfg: dict, sd: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder/'config.json').write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder/'model.safetensors'))


def test_strict_wrong_keys_and_shapes(tiny_model, tmp_path):
    sd = dict(tiny_model.state_dict())
    sd.pop('trunk.norm.weight')
    sd['trunk.blocks.0.attn.bogus'] = torch.zeros(3)
    sd['visual_proj.weight'] = torch.zeros(64, 8)
    _write(tmp_path, tiny_model.config.to_dict(), sd)
    with pytest.raises(StateDictMismatchError) as e: VTPModel.from_pretrained(tmp_path)
    msg = str(e.value)
    for s in ('missing keys (1)', 'trunk.norm.weight: (64,)', 'unexpected keys (1)', 'trunk.blocks.0.attn.bogus: (3,)',
              'shape mismatches (1)', 'visual_proj.weight: checkpoint (64, 8) vs model (64, 64)', 'model.safetensors'):
        assert s in msg, (s, msg)


def test_strict_config_errors(tiny_model, tmp_path):
    sd = tiny_model.state_dict()
    _write(tmp_path/'a', {**tiny_model.config.to_dict(), 'vision_dept': 3, 'transformers_version': 'x'}, sd)
    with pytest.raises(ValueError, match=r"unknown VTP config keys \['vision_dept'\]"): VTPModel.from_pretrained(tmp_path/'a')
    with pytest.raises(FileNotFoundError, match='missing config.json'): VTPModel.from_pretrained(tmp_path/'missing')
    with pytest.raises(ValueError, match='vision_embed_dim=100 is not divisible by vision_num_heads=3'):
        VTPConfig(vision_embed_dim=100, vision_num_heads=3)
    with pytest.raises(ValueError, match='image_size=33 is not divisible by vision_patch_size=4'): vtp_config('tiny', image_size=33)
    with pytest.raises(ValueError, match='not divisible by patch size 4'): tiny_model.get_reconstruction_latents(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="unknown VTP preset 'XXL'"): vtp_config('XXL')


# ---------------------------------------------------------------- 4. RoPE dtype
def test_rope_fp32_vs_bf16(tiny_io):
    inp, ref = tiny_io
    m32 = VTPModel.from_pretrained(TINY, rope_dtype='fp32')
    out = fixture_outputs(m32, inp['image'], inp['text'])
    diffs = {k: (out[k] - ref[k]).abs().max().item() for k in ref}
    assert max(diffs.values()) < 1e-2, diffs
    assert max(diffs[k] for k in ('latents', 'decoded', 'last_patch')) > 0    # the bf16 rounding is real, and reproduced
    out16 = fixture_outputs(VTPModel.from_pretrained(TINY, rope_dtype='bf16'), inp['image'], inp['text'])
    assert torch.equal(out['clip_text'], out16['clip_text']) and diffs['logit_scale'] == 0   # text tower has no RoPE
    assert diffs['clip_text'] < 1e-6                                          # and matches the official one to roundoff
    m32.set_rope_dtype('bf16')
    torch.testing.assert_close(fixture_outputs(m32, inp['image'], inp['text'])['decoded'], ref['decoded'], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- training-only parts
def test_pretrain_wrapper_and_ema():
    torch.manual_seed(0)
    pm = VTPPretrainModel(vtp_config('tiny'))
    released = set(VTPModel(vtp_config('tiny')).state_dict())
    assert set(pm.model.state_dict()) == released
    assert not any(k.startswith(('dino_head', 'teacher')) for k in pm.model.state_dict())
    assert all(not p.requires_grad for p in pm.teacher.parameters())
    img = torch.randn(4, 3, 32, 32)
    masks = torch.zeros(4, 64, dtype=torch.bool); masks[:, ::3] = True
    cls, patch = pm.model.forward_features(img, masks)
    assert cls.shape == (4, 64) and patch.shape == (4, 64, 64)
    (pm.dino_head(cls).logsumexp(-1).mean() + pm.dino_head(patch[masks]).logsumexp(-1).mean()).backward()
    assert pm.model.trunk.mask_token.grad.abs().sum() > 0 and pm.dino_head.mlp[0].weight.grad is not None
    t0 = {k: v.clone() for k, v in pm.teacher.state_dict().items()}
    with torch.no_grad():
        for p in pm.student().parameters(): p.add_(0.5)
    pm.update_teacher(0.75)
    for k, v in pm.teacher.named_parameters():
        torch.testing.assert_close(v, 0.75 * t0[k] + 0.25 * (t0[k] + 0.5))
    with pytest.raises(ValueError, match='teacher/student parameters differ'): ema_update(pm.teacher, pm.model, 0.9)
    t = make_teacher(pm.model.trunk, pm.dino_head)
    assert all(torch.equal(a, b) for a, b in zip(t.parameters(), pm.student().parameters()))
