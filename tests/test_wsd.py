"""Warmup-stable-decay runs: a run that starts from the stable phase saved by a shorter one equals a run trained
alone (bit for bit), with every pre-training term (CLIP, DINO/iBOT with its centres and masks, reconstruction)."""
import json
import torch
from safetensors.torch import load_file
from vtp_nbdev.pretrain import PretrainConfig, pretrain
from vtp_nbdev.runs import read_jsonl, shared_prefix_dir


def _cfg(steps, **kw):
    return PretrainConfig(preset='tiny', losses='CLIP+SSL+AE', steps=steps, batch_clip=8, batch_ssl=4, batch_rec=4,
                          n_local_crops=2, schedule='wsd', warmup_steps=2, cooldown=0.25, log_every=1, ckpt_every=100,
                          dataset_kwargs={'size': 64}, **kw)


def _final(run):
    return load_file(run/'final'/'model.safetensors')


def test_branch_equals_alone(tmp_path):
    short = pretrain(_cfg(8), tmp_path/'shared', 'cpu', progress=False)      # stable phase saved at step 6
    branch = pretrain(_cfg(12), tmp_path/'shared', 'cpu', progress=False)    # starts at step 6
    alone = pretrain(_cfg(12), tmp_path/'alone', 'cpu', progress=False)
    saved = sorted(p.name for p in shared_prefix_dir('tokenizer', _cfg(8).shared_prefix_key(), tmp_path/'shared').glob('step-*'))
    assert saved == ['step-00000006.safetensors', 'step-00000009.safetensors']
    assert read_jsonl(branch/'metrics.jsonl')[0]['step'] == 7
    a, b = _final(branch), _final(alone)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = {r['step']: r['loss'] for r in read_jsonl(alone/'metrics.jsonl')}
    assert all(la[r['step']] == r['loss'] for r in read_jsonl(branch/'metrics.jsonl'))
    assert json.loads((short/'done.json').read_text())['steps'] == 8


def test_pairs_stay_together(tmp_path):
    from vtp_nbdev.pretrain import PretrainRecipe
    r = PretrainRecipe(_cfg(4, dataset='shape_pairs'))
    r.setup(torch.device('cpu'), 0, 1)
    idx = r._indices(3)
    assert [i // 2 for i in idx[::2]] == [i // 2 for i in idx[1::2]] and len(idx) == 8
