"Text-to-image track: model shapes, guidance, null-caption dropout, captions of latents (flips), the attribute metric, training."
import json, shutil
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from vtp_nbdev.data import tokenize, shapes_sample, shape_pairs_sample, SPLIT_OFFSETS, PROCEDURAL
from vtp_nbdev.dit import dit_config
from vtp_nbdev.flow import guided_velocity
from vtp_nbdev.fid import attribute_accuracy, attribute_values, predict_attributes
from vtp_nbdev.latents import extract_latents
from vtp_nbdev.t2i_model import T2IDiT, load_t2i
from vtp_nbdev.t2i import (T2ITrainConfig, flip_caption, flip_attributes, latents_captions, caption_token_table,
                           train_t2i, T2I_SAMPLERS)
from vtp_nbdev.t2i_generate import T2IConfig, eval_prompts, names_value, sample_t2i, t2i_metrics
from vtp_nbdev.t2i_scaling import t2i_param_count, t2i_settings

STRIP = ('time_s', 'samples_per_s')


def model_args(**kw):
    a = {k: v for k, v in dit_config('tiny', input_size=8, in_channels=16).items() if k not in ('num_classes', 'class_dropout_prob')}
    return dict(a, text_width=32, text_depth=1, text_heads=2, **kw)


def opened(model):
    "The model with random weights everywhere (the zero-initialised caption paths opened)."
    torch.manual_seed(1)
    for p in model.parameters(): p.data.normal_(0, 0.1)
    return model.eval()


def small_cfg(**kw):
    return T2ITrainConfig(**{**dict(preset='tiny', steps=6, batch=8, lr=1e-3, ema_decay=0.9, log_every=1, ckpt_every=2,
                                    text=dict(width=32, depth=1, heads=2)), **kw})


def test_shapes_and_guidance():
    net = opened(T2IDiT(**model_args()))
    x, t = torch.randn(3, 16, 8, 8), torch.rand(3)
    y = tokenize(['a red circle', 'two huge blue boxes at the top left', 'three green crosses'], 32)
    vc = net(x, t, y)
    assert vc.shape == (3, 16, 8, 8)
    vu = net(x, t, tokenize(['', '', ''], 32))
    assert (vc - vu).abs().max() > 1e-3
    torch.testing.assert_close(guided_velocity(net, x, t, y, 1.0), vc)
    torch.testing.assert_close(guided_velocity(net, x, t, y, 1.0 + 1e-9), vc, atol=1e-5, rtol=1e-5)   # the batched [cond; uncond] path
    torch.testing.assert_close(guided_velocity(net, x, t, y, 0.0), vu, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided_velocity(net, x, t, y, 3.0), vu + 3 * (vc - vu), atol=1e-4, rtol=1e-4)
    z = sample_t2i(net, y, num_steps=3, cfg_scale=2.0)
    assert z.shape == (3, 16, 8, 8) and torch.isfinite(z).all()


def test_null_caption_dropout():
    net = opened(T2IDiT(**model_args(caption_dropout_prob=0.5)))
    y = tokenize(['a red circle'] * 64, 32)
    null = tokenize('', 32)[0]
    assert torch.equal(net.caption_tokens(y), y)                                  # eval mode: no dropout
    net.train(); torch.manual_seed(0)
    d = net.caption_tokens(y)
    dropped = (d == null).all(1)
    assert 15 < dropped.sum() < 49 and torch.equal(d[~dropped], y[~dropped])      # about half, the rest untouched
    forced = net.caption_tokens(y, force_drop_ids=(torch.arange(64) % 2))         # forced drops override the random ones
    assert torch.equal((forced == null).all(1), torch.arange(64) % 2 == 1)
    assert torch.equal(net.null_label, null)                                      # guidance's unconditional input
    assert not any(k.startswith('y_embedder') for k in net.state_dict())          # no label table
    with pytest.raises(ValueError, match='int64 token ids'): net(torch.randn(1, 16, 8, 8), torch.rand(1), y[:1, :8])


def test_captions_of_latents_and_flips(tiny_latents, tmp_path):
    tok, lat = tiny_latents
    c = latents_captions(lat)
    assert len(c['captions']) == 48
    for i in (0, 17, 47):
        _, cap, _, attrs = shapes_sample(SPLIT_OFFSETS['train'] + i, 0, 32)
        assert c['captions'][i] == cap and c['attrs'][i] == attrs
        assert c['flipped'][i] == flip_caption(cap)
    sides = [i for i, a in enumerate(c['attrs']) if a['position'] != 'centre']
    assert all(('left' in c['captions'][i]) == ('right' in c['flipped'][i]) for i in sides)
    assert flip_caption('three boxes in the upper left corner') == 'three boxes in the upper right corner'
    table = caption_token_table(lat, 32)
    assert table.shape == (2, 48, 32)
    assert torch.equal(table[1, sides[0]], tokenize(c['flipped'][sides[0]], 32)[0])
    # the flipped image really shows the mirrored position (read by the reference network)
    real = torch.stack([torch.from_numpy(shapes_sample(i, 0, 32)[0]).permute(2, 0, 1) for i in range(48)])
    pred = predict_attributes(real.flip(-1))
    assert np.mean([p['position'] == flip_attributes(a)['position'] for p, a in zip(pred, c['attrs'])]) > 0.85
    # latents of another dataset are refused with a clear error
    bad = tmp_path/'lat'; shutil.copytree(lat, bad)
    cfg = json.loads((bad/'config.json').read_text()); (bad/'config.json').write_text(json.dumps({**cfg, 'dataset': 'fashion_mnist'}))
    with pytest.raises(ValueError, match='need one of'): latents_captions(bad)
    with pytest.raises(ValueError, match='needs one of'): t2i_metrics(tok, T2IConfig(dataset='fashion_mnist'))


def test_attribute_metric_on_real_images():
    P = eval_prompts(100)
    ok = attribute_accuracy(P['images'], P['attrs'])
    assert ok['attr_all_acc'] > 0.9 and min(ok[f'attr_{k}_acc'] for k in ('shape', 'colour', 'size', 'count', 'position')) > 0.95
    shuffled = P['attrs'][1:] + P['attrs'][:1]                                     # images of other prompts: the metric must drop
    assert attribute_accuracy(P['images'], shuffled)['attr_all_acc'] < 0.1
    for k in ('shape', 'position'):
        counts = [sum(a[k] == v for a in P['attrs']) for v in {a[k] for a in P['attrs']}]
        assert max(counts) - min(counts) <= 1                                      # balanced prompts


def test_shape_pairs_captions_prompts_and_metrics(tiny_latents, tmp_path):
    "`shape_pairs`: captions of its latents (a flip keeps them), prompts that name every scored attribute, its metrics."
    tok, _ = tiny_latents
    lat = extract_latents(tok, 'shape_pairs', n=16, dataset_kwargs={'size': 16}, runs_dir=tmp_path, stats_samples=16, progress=False)
    c = latents_captions(lat)
    for i in (0, 7, 15):
        _, cap, _, attrs = shape_pairs_sample(SPLIT_OFFSETS['train'] + i, 0, 32)
        assert c['captions'][i] == cap and c['attrs'][i] == attrs
    assert c['flipped'] == c['captions'] and flip_attributes(c['attrs'][0], 'shape_pairs') == c['attrs'][0]
    assert set(T2I_SAMPLERS) == set(PROCEDURAL)
    P = eval_prompts(40, dataset='shape_pairs')
    assert attribute_accuracy(P['images'], P['attrs'], dataset='shape_pairs')['attr_all_acc'] > 0.9
    for k, vals in attribute_values('shape_pairs').items():
        counts = [sum(a[k] == v for a in P['attrs']) for v in vals]
        assert max(counts) - min(counts) <= 1, (k, counts)                         # balanced prompts
        assert all(names_value(cap, a[k]) for cap, a in zip(P['captions'], P['attrs'])), k   # each names every attribute
    cfg = T2IConfig(dataset='shape_pairs', n_latents=16, train=dict(preset='tiny', steps=2, batch=8, log_every=1, ckpt_every=2),
                    text=dict(width=32, depth=1, heads=2), eval_points=1, n_prompts=8, steps=2)
    m = t2i_metrics(tok, cfg, runs_dir=tmp_path, device='cpu', progress=False)
    assert np.isfinite(m['FD_shape_pairs']) and 'FD_shapes' not in m and m['extractor'] == 'vtp-ref-shape_pairs'
    assert {k for k in m if k.startswith('attr_')} == {f'attr_{a}_acc' for a in ('shape', 'colour', 'size', 'background')} | {'attr_all_acc'}
    assert m['real_attr_all_acc'] > 0.8 and m['t2i_config']['dataset'] == 'shape_pairs'
    assert [t2i_settings(s).dataset for s in ('smoke', 'cpu', 'paper')] == ['shape_pairs', 'shape_pairs', 'shapes']


def test_loss_falls(tiny_latents, tmp_path):
    _, lat = tiny_latents
    run = train_t2i(small_cfg(steps=40, batch=16, lr=2e-3, ckpt_every=40, eval_points=1), lat, tmp_path, 'cpu', progress=False)
    loss = [json.loads(l)['loss'] for l in (run/'metrics.jsonl').read_text().splitlines()]
    assert len(loss) == 40 and np.mean(loss[-8:]) < np.mean(loss[:8]) - 0.1, (loss[:8], loss[-8:])


def test_resume_bit_identical(tiny_latents, tmp_path):
    _, lat = tiny_latents
    full = train_t2i(small_cfg(), lat, tmp_path/'a', 'cpu', progress=False)
    part = train_t2i(small_cfg(), lat, tmp_path/'b', 'cpu', max_steps=3, progress=False)
    assert not (part/'done.json').exists()
    part = train_t2i(small_cfg(), lat, tmp_path/'b', 'cpu', progress=False)
    rows = lambda r: [{k: v for k, v in json.loads(l).items() if k not in STRIP} for l in (r/'metrics.jsonl').read_text().splitlines()]
    assert rows(full) == rows(part)
    for n in ('model.safetensors', 'online.safetensors'):
        a, b = load_file(full/'final'/n), load_file(part/'final'/n)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model, transport = load_t2i(full/'final')
    assert torch.equal(model.null_label, tokenize('', 32)[0]) and transport['use_cosine_loss']


def test_grad_accum_matches_full_batch(tiny_latents, tmp_path):
    "`train_t2i` is `train_dit` with a recipe: gradient accumulation works for it too (same losses as the full batch)."
    _, lat = tiny_latents
    rows = lambda r: [json.loads(l)['loss'] for l in (r/'metrics.jsonl').read_text().splitlines()]
    full = train_t2i(small_cfg(steps=3), lat, tmp_path, 'cpu', progress=False)
    acc = train_t2i(small_cfg(steps=3, grad_accum=2), lat, tmp_path, 'cpu', progress=False)
    assert full != acc and (acc/'snapshots').is_dir()
    np.testing.assert_allclose(rows(acc), rows(full), rtol=1e-4)


def test_paper_config_instantiates():
    pc = t2i_param_count('paper')
    assert 100e6 < pc['text'] < 140e6 and pc['dit'] > 130e6
