"""Provenance of a run's weights: the phases that trained it (shared prefix, own segments, resumes) and their commits."""
import json
from vtp_nbdev.config import cpu_kind, environment_info
from vtp_nbdev.pretrain import PretrainConfig, pretrain
from vtp_nbdev.runs import read_jsonl, shared_prefix_checkpoint, prefix_provenance_path
from vtp_nbdev.scaling import trained_phases, phase_commits, phase_problems

SMALL = dict(vision_depth=1, decoder_depth=1, text_depth=1, dino_out_dim=128, dino_hidden_dim=32, dino_bottleneck_dim=16)
FAKE = 'f' * 40


def _cfg(steps, **kw):
    "A tiny warmup-stable-decay run: the stable phase of `steps` 8 ends at step 6, of 12 at step 9."
    base = dict(preset='tiny', model=SMALL, losses='CLIP+SSL+AE', steps=steps, batch_clip=8, batch_ssl=4, batch_rec=4,
                n_local_crops=1, schedule='wsd', warmup_steps=2, cooldown=0.25, log_every=1, ckpt_every=100,
                dataset_kwargs={'size': 24})
    return PretrainConfig(**{**base, **kw})


def _train(cfg, runs, **kw):
    return pretrain(cfg, runs_dir=runs, device='cpu', progress=False, **kw)


def _phases(run) -> list:
    return json.loads((run/'done.json').read_text())['phases']


def _spans(phases) -> list:
    return [(p['from_step'], p['to_step'], p['source']) for p in phases]


def test_run_from_shared_prefix_lists_the_prefix_phase_first(tmp_path):
    short = _train(_cfg(8), tmp_path)                                       # saves the stable phase at step 6
    long = _train(_cfg(12), tmp_path)                                       # starts at step 6, saves step 9
    assert _spans(_phases(short)) == [(0, 8, 'scratch')]
    assert _spans(_phases(long)) == [(0, 6, 'scratch'), (6, 12, 'shared_prefix')]
    env = environment_info()
    assert all((p['git_commit'], p['git_dirty'], p['cpu_kind']) == (env['git_commit'], env['git_dirty'], cpu_kind())
               for p in _phases(long))
    saved = shared_prefix_checkpoint('tokenizer', _cfg(12).shared_prefix_key(), 9, tmp_path)
    prov = json.loads(prefix_provenance_path(saved).read_text())
    assert (prov['step'], prov['environment']['git_commit']) == (9, env['git_commit'])
    assert _spans(prov['phases']) == [(0, 6, 'scratch'), (6, 9, 'shared_prefix')]   # the prefix's own phases carried
    assert _spans(trained_phases(long, 9)) == [(0, 6, 'scratch'), (6, 9, 'shared_prefix')]


def test_stopped_and_resumed_run_has_two_phases_and_no_duplicate(tmp_path):
    cfg = _cfg(8, schedule='cosine')
    run = _train(cfg, tmp_path, max_steps=3)
    assert [(p['from_step'], p['source']) for p in read_jsonl(run/'phases.jsonl')] == [(0, 'scratch')]
    _train(cfg, tmp_path, max_steps=3)                                      # nothing left to train: no phase
    assert [(p['from_step'], p['source']) for p in read_jsonl(run/'phases.jsonl')] == [(0, 'scratch')]
    _train(cfg, tmp_path)                                                   # resumed from step 3
    assert _spans(_phases(run)) == [(0, 3, 'scratch'), (3, 8, 'checkpoint')]
    done = (run/'done.json').read_text()
    _train(cfg, tmp_path)                                                   # a finished run: returned as it is
    assert (run/'done.json').read_text() == done and len(read_jsonl(run/'phases.jsonl')) == 2


def test_commit_of_the_prefix_is_carried_into_later_runs(tmp_path):
    _train(_cfg(8), tmp_path)
    saved = shared_prefix_checkpoint('tokenizer', _cfg(8).shared_prefix_key(), 6, tmp_path)
    fake = dict(from_step=0, to_step=6, source='scratch', git_commit=FAKE, git_dirty=True, cpu_kind='fake-kind')
    prefix_provenance_path(saved).write_text(json.dumps(dict(step=6, environment={}, phases=[fake])))
    long = _train(_cfg(12), tmp_path)
    first, own = _phases(long)
    assert first == fake and (own['from_step'], own['source']) == (6, 'shared_prefix')
    rec = dict(scale='cpu', phases=trained_phases(long, 12))
    assert phase_commits(rec)[0] == FAKE and phase_commits(rec)[1:] == [c for c in [own['git_commit']] if c]
    assert phase_problems(rec)[0] == f"steps 0-6 (scratch): trained at {FAKE[:12]} with uncommitted changes"
