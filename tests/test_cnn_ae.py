"""The CNN auto-encoder (`vision_arch='cnn'`, the paper's Table 1 baseline): the ViT's latent interface, exact checkpoint I/O,
AE training, refusal of CLIP/SSL, paper-scale size on the meta device, and unchanged config hashes of every ViT run."""
import json
from pathlib import Path

import pytest
import torch

from vtp_nbdev.config import config_hash
from vtp_nbdev.tokenizer import (CNNEncoder, CNNDecoder, VTPConfig, VTPModel, VTPPretrainModel, count_params, vtp_config,
                                 vtp_forward_flops)
from vtp_nbdev.pretrain import PretrainConfig, pretrain

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize('cnn,vit,res', [('cnn_tiny', 'tiny', 32), ('paper_cnn', 'paper_B', 256)])
def test_latent_shape_equals_vit(cnn, vit, res):
    with torch.device('meta'):                                   # paper scale: shapes only, no memory
        c, v = VTPModel(vtp_config(cnn)), VTPModel(vtp_config(vit, train_clip=False))
        x = torch.empty(2, 3, res, res)
        zc, zv = c.get_reconstruction_latents(x), v.get_reconstruction_latents(x)
        assert zc.shape == zv.shape and c.get_latents_decoded_images(zc).shape == x.shape
    assert isinstance(c.trunk, CNNEncoder) and isinstance(c.pixel_decoder, CNNDecoder)


def test_probe_features_and_intermediate_layers():
    from vtp_nbdev.eval_understanding import probe_features
    from vtp_nbdev.data import ShapesDataset
    torch.manual_seed(0)
    m = VTPModel(vtp_config('cnn_tiny')).eval()
    pf = probe_features(m, ShapesDataset('train', size=8), batch_size=8)
    C = m.trunk.embed_dim
    assert {k: tuple(v.shape) for k, v in pf.items()} == dict(bottleneck=(8, 16), last=(8, C), last4_avgpool=(8, 3 * C), labels=(8,))
    x = torch.stack([ShapesDataset('train', size=8)[i]['image'] for i in range(8)])
    with torch.no_grad(): torch.testing.assert_close(pf['last'], m.get_last_layer_feature(x)['cls_token'], atol=1e-5, rtol=0)


def test_save_load_round_trip_bit_exact(tmp_path):
    from vtp_nbdev.latents import extract_latents, load_latents_stats
    torch.manual_seed(0)
    m = VTPModel(vtp_config('cnn_tiny')).eval()
    m.save_pretrained(tmp_path/'tok')
    cfg = json.loads((tmp_path/'tok'/'config.json').read_text())
    assert cfg['vision_arch'] == 'cnn' and cfg['cnn_channel_mult'] == [1, 1, 1]
    m2 = VTPModel.from_pretrained(tmp_path/'tok')
    assert m2.config == m.config
    sd1, sd2 = m.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) and sd1[k].dtype == sd2[k].dtype for k in sd1)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), m2(x)) and torch.equal(m.get_reconstruction_latents(x), m2.get_reconstruction_latents(x))
    run = extract_latents(tmp_path/'tok', 'shapes', n=8, dataset_kwargs={'size': 8}, runs_dir=tmp_path/'runs', shard_size=8,
                          stats_samples=8, progress=False)                     # the latents pipeline takes the CNN folder as is
    assert load_latents_stats(run)['mean'].shape == (1, 16, 1, 1)


def test_few_pretrain_steps_reduce_ae_loss(tmp_path):
    cfg = PretrainConfig(preset='cnn_tiny', losses='AE', steps=30, batch_clip=8, batch_rec=8, lr=2e-3, warmup=0.1, log_every=1,
                         ckpt_every=30, dataset_kwargs={'size': 8})          # the same 8 images every step: no batch-to-batch noise
    run = pretrain(cfg, runs_dir=tmp_path, device='cpu', progress=False)
    rows = [json.loads(l) for l in (run/'metrics.jsonl').read_text().splitlines()]
    first, last = sum(r['rec'] for r in rows[:3]) / 3, sum(r['rec'] for r in rows[-3:]) / 3
    assert last < 0.85 * first, [round(r['rec'], 3) for r in rows]
    assert rows[0]['flops_per_step'] > 0
    m = VTPModel.from_pretrained(run/'final')                                  # the exported tokenizer is a CNN again
    assert m.config.vision_arch == 'cnn' and m.get_reconstruction_latents(torch.zeros(1, 3, 32, 32)).shape == (1, 16, 8, 8)


@pytest.mark.parametrize('losses', ['CLIP+AE', 'SSL+AE', 'CLIP+SSL+AE'])
def test_clip_and_ssl_refused(losses):
    with pytest.raises(ValueError, match=rf"losses='{losses.replace('+', '[+]')}' needs a ViT tokenizer.*vision_arch='cnn'.*losses='AE'"):
        PretrainConfig(preset='cnn_tiny', losses=losses)


def test_cnn_only_parts_refused():
    with pytest.raises(ValueError, match='train_clip=True needs the ViT tokenizer'): vtp_config('cnn_tiny', train_clip=True)
    with pytest.raises(ValueError, match='DINO/iBOT need the ViT tokenizer'): VTPPretrainModel(vtp_config('cnn_tiny'), ssl=True)
    with pytest.raises(ValueError, match=r'cnn_channel_mult=\(1, 2\) must hold log2\(vision_patch_size=4\) \+ 1 = 3'):
        vtp_config('cnn_tiny', cnn_channel_mult=(1, 2))
    with pytest.raises(ValueError, match="vision_arch='convnext'"): vtp_config('tiny', vision_arch='convnext')
    with pytest.raises(ValueError, match="only used with vision_arch='cnn'"): vtp_config('tiny', cnn_channel_mult=(1, 1, 1))
    m = VTPModel(vtp_config('cnn_tiny'))
    with pytest.raises(ValueError, match='iBOT masking needs the ViT tokenizer'):
        m.forward_features(torch.zeros(1, 3, 32, 32), torch.zeros(1, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match='stochastic depth needs the ViT tokenizer'): m.trunk.set_drop_path(0.1)
    with pytest.raises(ValueError, match='not divisible by patch size 4'): m.get_reconstruction_latents(torch.zeros(1, 3, 30, 32))
    with pytest.raises(RuntimeError, match='train_clip=True'): m.get_clip_text_feature(torch.ones(1, 4, dtype=torch.long))


def test_existing_hashes_unchanged():
    "The new config fields are hash-neutral at their defaults: every ViT config, run and cached result keeps its hash."
    d = PretrainConfig().to_dict()
    assert 'num_workers' not in d                                             # identical batches: not hashed while 0
    assert config_hash({'num_workers': 0, **d}) == '63b13edf54de'
    pinned = dict(tiny='5f1631fe4eb8', S='0315474ee99f', paper_L='5fb09977f537')
    assert {n: config_hash(vtp_config(n).to_dict()) for n in pinned} == pinned
    assert 'vision_arch' not in VTPConfig().to_dict() and 'cnn_channel_mult' not in VTPConfig().to_dict()
    d = vtp_config('cnn_tiny').to_dict()
    assert d['vision_arch'] == 'cnn' and d['cnn_channel_mult'] == (1, 1, 1)       # non-default: written and hashed
    assert config_hash(d) != config_hash(vtp_config('tiny', train_clip=False).to_dict())


def test_committed_cpu_ae_point_still_found():
    "The cpu-scale AE tiny point keeps its record name, so Table 1's ViT row at cpu is read from the committed store."
    from vtp_nbdev.scaling import scaling_config, point_path
    cfg = scaling_config('cpu', 'AE', 0)
    p = point_path(cfg, cfg.steps, 'cpu', root=ROOT)
    if not p.exists(): pytest.skip(f'no committed cpu results at {p.parent}')
    rec = json.loads(p.read_text())
    from vtp_nbdev.pretrain import run_dir_for
    assert rec['config_hash'] == run_dir_for(cfg).name and rec['steps_total'] == cfg.steps   # the record of this run


def test_paper_preset_flops_and_params_on_meta():
    from vtp_nbdev.figures import PAPER_TABLE1
    paper = PAPER_TABLE1.set_index('arch').loc['CNN (LDM)']
    with torch.device('meta'): m = VTPModel(vtp_config('paper_cnn'))
    f = vtp_forward_flops(m)
    assert set(f) == {'encoder', 'decoder'}                                   # no text tower
    gflops, params = (f['encoder'] + f['decoder']) / 1e9, count_params(m) / 1e6
    assert abs(gflops / paper.gflops - 1) < 0.05, gflops                     # 386.6 vs 389.4
    assert abs(params / paper.params_M - 1) < 0.15, params                   # 64.2 vs 70.3 (no KL heads)
    assert count_params(m) == count_params(m.trunk) + count_params(m.pixel_decoder)
