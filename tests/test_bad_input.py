"""Bad input: out-of-range labels, decompression bombs, long captions, impossible sizes, wrong config types, corrupt or
foreign checkpoints, wrong model inputs, unpickling."""
import ast, csv, io, json, re, shutil, struct, tarfile, warnings, zlib
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from vtp_nbdev.data import ImageFolderDataset, ImageTextDataset, TarShardDataset, BadSampleError, tokenize
from vtp_nbdev.tokenizer import VTPModel, vtp_config, StateDictMismatchError
from vtp_nbdev.dit import LightningDiT, build_dit, load_lightningdit, save_lightningdit
from vtp_nbdev.eval_understanding import train_linear_probe
from vtp_nbdev.flow import DiTTrainConfig, train_dit, sample_latents

PKG = Path(__file__).resolve().parents[1]/'vtp_nbdev'
SOT, EOT = 49406, 49407


def names_value_and_range(value, n: int) -> str:
    "Regex: the message names the offending value and the valid range [0, n)."
    return rf"(?s)(?=.*(?<![\d.-]){re.escape(str(value))}(?![\d.]))(?=.*(\[0, ?{n}\)|0 ?\.\. ?{n - 1}|num_classes ?= ?{n}))"


# ---- labels outside the classes ------------------------------------------------------------------------------------
_PROBE_BAD = [('train', 4), ('train', -1), ('test', 7)]


@pytest.mark.parametrize('split,bad', _PROBE_BAD, ids=[f'{s}{b}' for s, b in _PROBE_BAD])
def test_linear_probe_rejects_labels_outside_classes(split, bad):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 8, generator=g), torch.arange(40) % 4
    ytr, yte = y.clone(), y.clone()
    (ytr if split == 'train' else yte)[5] = bad
    with pytest.raises(ValueError, match=names_value_and_range(bad, 4)):
        train_linear_probe(x, ytr, x, yte, lrs=(1e-2,), epochs=1, num_classes=4)


@pytest.mark.parametrize('bad', [20, 25, -1])
def test_sample_latents_rejects_labels_outside_classes(bad):
    torch.manual_seed(0)
    m = build_dit('tiny', depth=1)                                            # 20 classes (+ the null class of CFG)
    with pytest.raises(ValueError, match=names_value_and_range(bad, 20)):
        sample_latents(m, 2, labels=torch.tensor([0, bad]), num_steps=2)


@pytest.fixture
def latents(tiny_latents):
    "The shared tiny latents run (conftest)."
    return tiny_latents[1]


@pytest.mark.parametrize('bad', [20, 25, -1])
def test_train_dit_rejects_latent_labels_outside_classes(bad, latents, tmp_path):
    lat = tmp_path/'lat'; shutil.copytree(latents, lat)
    shard = lat/'shard-00001.safetensors'
    t = load_file(shard); t['labels'][3] = bad
    save_file(t, str(shard), metadata={'total_size': str(len(t['labels']))})
    cfg = DiTTrainConfig(steps=2, batch=48, log_every=1, ckpt_every=2, model={'depth': 1})
    with pytest.raises(ValueError, match=names_value_and_range(bad, 20)):
        train_dit(cfg, lat, tmp_path/'runs', 'cpu', progress=False)


# ---- decompression bombs ----------------------------------------------------------------------------------------------
def _bomb_png(w=20_000, h=20_000) -> bytes:
    "A valid-header PNG of w x h 1-bit pixels in a few hundred bytes (PIL refuses it on open: > 2 x MAX_IMAGE_PIXELS)."
    chunk = lambda t, d: struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d) & 0xffffffff)
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 1, 0, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(b'\x00' * 64)) + chunk(b'IEND', b''))


def _good_png() -> bytes:
    b = io.BytesIO(); Image.fromarray(np.full((20, 20, 3), 200, np.uint8)).save(b, 'PNG'); return b.getvalue()


def _bomb_dataset(kind, tmp_path, **kw):
    "A dataset whose first sample is a 20000x20000 decompression bomb and whose second is a good image; (dataset, bomb name)."
    if kind == 'image_folder':
        (tmp_path/'cls').mkdir(); (tmp_path/'cls'/'a_bomb.png').write_bytes(_bomb_png()); (tmp_path/'cls'/'b_good.png').write_bytes(_good_png())
        return ImageFolderDataset(tmp_path, res=16, **kw), 'a_bomb.png'
    if kind == 'image_text':
        (tmp_path/'bomb.png').write_bytes(_bomb_png()); (tmp_path/'good.png').write_bytes(_good_png())
        (tmp_path/'t.csv').write_text('path,caption\nbomb.png,a huge image\ngood.png,a grey square\n')
        return ImageTextDataset(tmp_path/'t.csv', res=16, **kw), 'bomb.png'
    with tarfile.open(tmp_path/'s.tar', 'w') as tf:
        for name, data in (('k0.png', _bomb_png()), ('k0.txt', b'a huge image'), ('k1.png', _good_png()), ('k1.txt', b'a grey square')):
            ti = tarfile.TarInfo(name); ti.size = len(data); tf.addfile(ti, io.BytesIO(data))
    return TarShardDataset(tmp_path/'s.tar', res=16, **kw), 's.tar:k0'


@pytest.mark.parametrize('kind', ['image_folder', 'image_text', 'tar'])
def test_decompression_bomb_is_named_or_skipped(kind, tmp_path):
    ds, name = _bomb_dataset(kind, tmp_path)
    with pytest.raises(BadSampleError, match=rf"{re.escape(name)}: cannot read image \(DecompressionBombError: .*400000000 pixels"):
        ds[0]
    (tmp_path/'skip').mkdir()
    ds, name = _bomb_dataset(kind, tmp_path/'skip', skip_bad=True)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        s = ds[0]                                                             # the next good sample instead
    assert s['image'].shape == (3, 16, 16) and s['caption'] in ('a grey square', 'a photo of a cls.', 'a picture of a cls.',
                                                                   'an image of a cls.', 'a close-up photo of a cls.')
    assert ds.n_skipped == 1 and any(name in str(x.message) and 'DecompressionBomb' in str(x.message) for x in w)


def test_image_over_the_pixel_limit_is_named_or_skipped(tmp_path):
    "9000x9000 (81M pixels: under PIL's bomb limits) is refused from its header by vtp_nbdev.data.MAX_IMAGE_PIXELS (64Mi)."
    from vtp_nbdev.data import load_image
    (tmp_path/'cls').mkdir(); (tmp_path/'cls'/'a_big.png').write_bytes(_bomb_png(9000, 9000)); (tmp_path/'cls'/'b_good.png').write_bytes(_good_png())
    msg = r"9000x9000 image \(81000000 pixels\) exceeds the limit of 67108864 pixels"
    with pytest.raises(BadSampleError, match=r"a_big\.png: " + msg): load_image(tmp_path/'cls'/'a_big.png', 16)
    with pytest.raises(BadSampleError, match=r"s\.tar:k0: " + msg): load_image(_bomb_png(9000, 9000), 16, name='s.tar:k0')
    with pytest.raises(BadSampleError, match=r"a_big\.png: " + msg): ImageFolderDataset(tmp_path, res=16)[0]
    ds = ImageFolderDataset(tmp_path, res=16, skip_bad=True)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        s = ds[0]                                                             # the next good sample instead
    assert s['image'].shape == (3, 16, 16) and ds.n_skipped == 1
    assert any('a_big.png' in str(x.message) and '81000000 pixels' in str(x.message) for x in w)


# ---- very long captions ------------------------------------------------------------------------------------------------
def test_ten_thousand_character_caption_is_truncated_to_the_context(tmp_path):
    import open_clip
    rng = np.random.default_rng(0)
    words = [''.join(rng.choice(list('abcdefghijklmnopqrstuvwxyz'), rng.integers(2, 9))) for _ in range(2500)]
    cap = ' '.join(words)[:9_999] + 'q'
    assert len(cap) == 10_000
    (tmp_path/'g.png').write_bytes(_good_png())
    with open(tmp_path/'t.csv', 'w', newline='') as f: csv.writer(f).writerows([('path', 'caption'), ('g.png', cap), ('g.png', 'x' * 10_000)])
    ds = ImageTextDataset(tmp_path/'t.csv', res=16, context_length=32)
    for i in range(2):
        s = ds[i]
        assert s['caption'] == (cap, 'x' * 10_000)[i]                          # the caption itself is kept whole
        assert s['tokens'].shape == (32,) and s['tokens'][0] == SOT and s['tokens'][-1] == EOT and (s['tokens'] > 0).all()
    assert torch.equal(ds[0]['tokens'], open_clip.get_tokenizer('ViT-B-32')([cap], context_length=32)[0])
    assert tokenize([cap, 'a cat'], 77).shape == (2, 77) and tokenize(cap, 77)[0, -1] == EOT


# ---- impossible sizes ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('overrides,msg', [
    (dict(vision_embed_dim=65), 'vision_embed_dim=65 is not divisible by vision_num_heads=2'),
    (dict(decoder_embed_dim=65), 'decoder_embed_dim=65 is not divisible by decoder_num_heads=2'),
    (dict(text_embed_dim=65), 'text_embed_dim=65 is not divisible by text_num_heads=2'),
    (dict(vision_num_heads=3), 'vision_embed_dim=64 is not divisible by vision_num_heads=3'),
    (dict(image_size=30), 'image_size=30 is not divisible by vision_patch_size=4'),
    (dict(vision_patch_size=5), 'image_size=32 is not divisible by vision_patch_size=5'),
    (dict(vision_embed_dim=72, vision_num_heads=4), r'vision: head dim 72//4=18 must be divisible by 4'),
])
def test_impossible_vtp_sizes_name_the_fields(overrides, msg, tmp_path):
    with pytest.raises(ValueError, match=msg): vtp_config('tiny', **overrides)
    # the same config.json in a checkpoint folder: refused before any weight is read
    (tmp_path/'config.json').write_text(json.dumps({**vtp_config('tiny').to_dict(), **overrides}))
    (tmp_path/'model.safetensors').write_bytes(b'not read')
    with pytest.raises(ValueError, match=msg): VTPModel.from_pretrained(tmp_path)


@pytest.mark.parametrize('args,msg', [
    (dict(input_size=9, patch_size=2), 'input_size=9 is not divisible by patch_size=2'),
    (dict(hidden_size=66, num_heads=4), 'hidden_size=66 is not divisible by num_heads=4'),
    (dict(hidden_size=56, num_heads=4, use_rope=True), 'RoPE needs head_dim .* divisible by 4, got 14'),
])
def test_impossible_dit_sizes_name_the_fields(args, msg):
    with pytest.raises(ValueError, match=msg): LightningDiT(**{**dict(depth=1, hidden_size=64, num_heads=4), **args})


def test_dit_train_config_checks_sizes():
    with pytest.raises(ValueError, match='hidden_size=66 is not divisible by num_heads=4'):
        DiTTrainConfig(model={'hidden_size': 66})


_ZERO = [('vtp', dict(vision_num_heads=0), 'vision_num_heads=0'), ('vtp', dict(vision_patch_size=0), 'vision_patch_size=0'),
         ('vtp', dict(image_size=0), 'image_size=0'), ('vtp', dict(vision_depth=-1), 'vision_depth=-1'),
         ('dit', dict(num_heads=0), 'num_heads=0'), ('dit', dict(patch_size=0), 'patch_size=0'), ('dit', dict(depth=-1), 'depth=-1')]


@pytest.mark.parametrize('which,args,msg', _ZERO, ids=[m for _, _, m in _ZERO])
def test_zero_or_negative_sizes_name_the_field(which, args, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        vtp_config('tiny', **args) if which == 'vtp' else LightningDiT(**{**dict(depth=1, hidden_size=64, num_heads=4), **args})


# ---- checkpoints of another architecture -------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def tiny_folder(tmp_path_factory):
    "A saved tiny VTP tokenizer without the text tower."
    torch.manual_seed(0)
    return VTPModel(vtp_config('tiny', train_clip=False)).save_pretrained(tmp_path_factory.mktemp('tok')/'tiny')


def _foreign(tmp_path, weights_from: Path, config: dict) -> Path:
    d = tmp_path/'foreign'; d.mkdir(parents=True)
    shutil.copyfile(weights_from, d/'model.safetensors'); (d/'config.json').write_text(json.dumps(config))
    return d


def test_vtp_checkpoint_of_another_architecture_lists_the_differences(tiny_folder, tmp_path):
    tiny = json.loads((tiny_folder/'config.json').read_text())
    cases = [  # (config that does not match the weights, strings the error must contain)
        ({**tiny, 'vision_depth': 4}, ['missing keys (', 'trunk.blocks.3.attn.qkv.weight']),
        ({**tiny, 'decoder_depth': 2}, ['unexpected keys (', 'pixel_decoder.blocks.2.']),
        ({**tiny, 'train_clip': True}, ['missing keys (', 'text_transformer.resblocks.0.', 'more']),
        ({**tiny, **{k: v for k, v in vtp_config('S').to_dict().items() if k.startswith(('vision_', 'decoder_'))}},
         ['shape mismatches (', 'trunk.cls_token: checkpoint (1, 1, 64) vs model (1, 1, 96)', 'missing keys (', 'trunk.blocks.4.']),
    ]
    for i, (cfg, must) in enumerate(cases):
        d = _foreign(tmp_path/str(i), tiny_folder/'model.safetensors', cfg)
        with pytest.raises(StateDictMismatchError) as e: VTPModel.from_pretrained(d)
        for s in must + [str(d/'model.safetensors')]: assert s in str(e.value), (i, s, str(e.value)[:2000])
    # a LightningDiT's weights in a VTP folder: every key is foreign
    save_lightningdit(build_dit('tiny', depth=1), tmp_path/'dit')
    d = _foreign(tmp_path/'x', tmp_path/'dit'/'model.safetensors', tiny)
    with pytest.raises(StateDictMismatchError, match=r'(?s)missing keys \(\d+\):.*trunk\.cls_token.*unexpected keys \(\d+\):.*final_layer\.linear\.weight'):
        VTPModel.from_pretrained(d)


def test_dit_checkpoint_of_another_architecture_lists_the_differences(tmp_path):
    torch.manual_seed(0)
    save_lightningdit(build_dit('tiny', depth=2), tmp_path/'a')
    cfg = json.loads((tmp_path/'a'/'config.json').read_text())
    (tmp_path/'a'/'config.json').write_text(json.dumps({**cfg, 'depth': 3}))
    with pytest.raises(StateDictMismatchError, match=r'(?s)missing keys \(\d+\):.*blocks\.2\.attn\.qkv\.weight'): load_lightningdit(tmp_path/'a')
    (tmp_path/'a'/'config.json').write_text(json.dumps({**cfg, 'num_classes': 10}))
    with pytest.raises(StateDictMismatchError, match=r'y_embedder\.embedding_table\.weight: checkpoint \(21, 64\) vs model \(11, 64\)'):
        load_lightningdit(tmp_path/'a')


# ---- loading never unpickles --------------------------------------------------------------------------------------------
def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call): yield node, ast.unparse(node.func)


def test_package_never_unpickles():
    files = sorted(PKG.glob('*.py'))
    assert len(files) > 10
    loads = []
    for f in files:
        tree = ast.parse(f.read_text(), str(f))
        for node, name in _calls(tree):
            where = f"{f.name}:{node.lineno}: {ast.unparse(node)[:120]}"
            if name in ('torch.load', 'torch.serialization.load'):
                kw = {k.arg: k.value for k in node.keywords}
                assert 'weights_only' in kw and isinstance(kw['weights_only'], ast.Constant) and kw['weights_only'].value is True, \
                    f"{where}: torch.load must pass weights_only=True (a checkpoint must never run pickled code)"
                loads.append(where)
            assert not name.startswith(('pickle.', 'cPickle.', 'dill.', 'joblib.')), f"{where}: unpickling"
            if name in ('np.load', 'numpy.load'):
                kw = {k.arg: k.value for k in node.keywords}
                assert not (isinstance(kw.get('allow_pickle'), ast.Constant) and kw['allow_pickle'].value), f"{where}: allow_pickle"
        for node in ast.walk(tree):                                          # `from torch import load` would dodge the check
            if isinstance(node, ast.ImportFrom) and node.module in ('torch', 'pickle', 'dill', 'joblib'):
                assert not {a.name for a in node.names} & {'load', 'loads', 'Unpickler'}, f"{f.name}:{node.lineno}: imports a pickle loader"
            if isinstance(node, ast.Import):
                assert not {a.name for a in node.names} & {'pickle', 'dill', 'cPickle'}, f"{f.name}:{node.lineno}: imports pickle"
    assert len(loads) == len(re.findall(r'torch\.load\(', ''.join(f.read_text() for f in files)))   # every textual call was seen
    assert loads, 'expected the .pt readers (dit.read_dit_state_dict, losses LPIPS weights) to be checked'


# ---- wrong types in tokenizer configs, corrupt checkpoints, wrong model inputs -------------------------------------
_MODEL_BAD = [('vision_embed_dim', '64', 'int', 'str'), ('vision_embed_dim', 64.0, 'int', 'float'),
              ('vision_depth', True, 'int', 'bool'), ('train_clip', 'yes', 'bool', 'str'),
              ('vision_mlp_ratio', '4', 'float', 'str'), ('vision_feature_bottleneck', 16.0, 'int | None', 'float')]


@pytest.mark.parametrize('field,value,want,got', _MODEL_BAD, ids=[f'{f}={v!r}' for f, v, *_ in _MODEL_BAD])
def test_model_overrides_typed_by_name(field, value, want, got):
    "`PretrainConfig(model={...})` is validated field by field: the field, the value and the expected type are named."
    from vtp_nbdev.pretrain import PretrainConfig
    msg = rf"VTPConfig\.{field}={re.escape(repr(value))}: expected {re.escape(want)}, got {got}"
    with pytest.raises(TypeError, match=msg):
        PretrainConfig(model={field: value})
    with pytest.raises(TypeError, match=msg):
        vtp_config('tiny', **{field: value})


@pytest.mark.parametrize('value', ['3', 3.0])
def test_config_json_wrong_type_names_file_and_field(tmp_path, value):
    VTPModel(vtp_config('tiny')).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path/'config.json').read_text())
    (tmp_path/'config.json').write_text(json.dumps({**cfg, 'vision_depth': value}))
    where = re.escape(str(tmp_path/'config.json'))
    with pytest.raises(TypeError, match=rf"{where}: VTPConfig\.vision_depth=.*expected int"):
        VTPModel.from_pretrained(tmp_path)
    (tmp_path/'config.json').write_text('{"vision_depth": ')
    with pytest.raises(ValueError, match=r"config\.json: not a JSON config"):
        VTPModel.from_pretrained(tmp_path)


@pytest.mark.parametrize('content', [b'\xff' * 64, b'', b'\x08\x00\x00\x00\x00\x00\x00\x00{"a":1}'],
                         ids=['garbage', 'empty', 'bad-header'])
def test_corrupt_safetensors_names_file(tmp_path, content):
    VTPModel(vtp_config('tiny')).save_pretrained(tmp_path)
    (tmp_path/'model.safetensors').write_bytes(content)
    where = re.escape(str(tmp_path/'model.safetensors'))
    with pytest.raises(ValueError, match=rf"{where}: unreadable safetensors file"):
        VTPModel.from_pretrained(tmp_path)


_INPUTS = [(torch.rand(2, 1, 32, 32), r'shape \(2, 1, 32, 32\); expected an RGB batch \(B, 3, H, W\)'),
           (torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8),
            r'dtype torch\.uint8; expected ImageNet-normalised floats'),
           (torch.rand(2, 3, 2, 2), r'image size \(2, 2\) is not divisible by patch size 4'),
           (torch.rand(3, 32, 32), r'shape \(3, 32, 32\)'),
           (np.zeros((1, 3, 32, 32), np.float32), r'expected a torch\.Tensor')]


@pytest.mark.parametrize('x,msg', _INPUTS, ids=['grey', 'uint8', 'too-small', 'unbatched', 'numpy'])
def test_model_inputs_checked(x, msg):
    m = VTPModel(vtp_config('tiny')).eval()
    for f in (m, m.get_reconstruction_latents, m.get_clip_image_feature, m.get_last_layer_feature,
              lambda t: m.get_intermediate_layers_feature(t, 2)):
        with pytest.raises((TypeError, ValueError), match=msg):
            f(x)
