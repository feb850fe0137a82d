"`shape_pairs` across modules: the dataset by name, its reference network, attribute accuracy and generation metrics."
import json, time
import numpy as np
import pytest
import torch
from vtp_nbdev.data import (DATASETS, PROCEDURAL, SHAPES_CLASSES, SHAPE_KINDS, ZERO_SHOT_TEMPLATES, ShapePairsDataset,
                            ShapesDataset, get_dataset, shapes_sample)
from vtp_nbdev.fid import (REFERENCE_EXTRACTORS, SHAPE_PAIRS_HEADS, attribute_accuracy, fidelity_metrics,
                           make_extractor, metric_suffix, predict_attributes, repo_root, sha256_file)


def test_get_dataset_builds_pairs():
    "`get_dataset('shape_pairs')` gives pairs 2j, 2j+1 that share everything but the shape."
    assert 'shape_pairs' in DATASETS and set(PROCEDURAL) == {'shapes', 'shape_pairs'}
    ds = get_dataset('shape_pairs', 'test', res=32, patch_size=8, size=40, seed=2)
    assert isinstance(ds, ShapePairsDataset) and ds.group == 2 and ds.classes == SHAPES_CLASSES
    assert ShapesDataset.group == 1 and set(ZERO_SHOT_TEMPLATES['shape_pairs']) == {'train', 'heldout'}
    for j in range(20):
        a, b = ds.attributes(2 * j), ds.attributes(2 * j + 1)
        assert a['shape'] != b['shape'] and {**a, 'shape': 0} == {**b, 'shape': 0}
        ia, ib = ds.raw(2 * j)[0], ds.raw(2 * j + 1)[0]
        assert (ia == ib).all(-1).mean() >= 0.6
    s = ds[0]
    assert s['image'].shape == (3, 32, 32) and 0 <= s['label'] < 20
    with pytest.raises(ValueError, match='unknown split'):
        get_dataset('shape_pairs', 'dev')


def test_shapes_unchanged():
    "The `shapes` samples keep their bytes (golden tests and committed results depend on them)."
    img, cap, label, attrs = shapes_sample(3)
    again = get_dataset('shapes', 'train', size=4).raw(3)
    assert np.array_equal(img, again[0]) and cap == again[1] and label == again[2]


def test_reference_extractor_entry_matches_file():
    "The committed weights match the recorded sha256; the JSON report records high held-out accuracy."
    rel, sha, arch = REFERENCE_EXTRACTORS['shape_pairs']
    path = repo_root()/rel
    assert sha256_file(path) == sha and arch['heads'] == SHAPE_PAIRS_HEADS
    report = json.loads(path.with_suffix('.json').read_text())
    assert report['sha256'] == sha
    assert report['accuracy']['test']['shape'] >= 0.97 and report['accuracy']['test']['colour'] >= 0.99
    fe = make_extractor('shape_pairs')
    assert fe.get_name() == 'vtp-ref-shape_pairs' and metric_suffix(fe.get_name()) == 'shape_pairs'


def test_attribute_accuracy_on_real_pairs():
    "The reference network reads shape, colour, size and background of real test images; shapes keeps its heads."
    ds = ShapePairsDataset('test', size=300, seed=5)
    x = torch.stack([torch.from_numpy(ds.raw(i)[0]).permute(2, 0, 1) for i in range(300)])
    attrs = [ds.attributes(i) for i in range(300)]
    acc = attribute_accuracy(x, attrs, dataset='shape_pairs')
    assert acc['attr_shape_acc'] >= 0.97 and acc['attr_colour_acc'] >= 0.99 and acc['attr_background_acc'] >= 0.95
    assert acc['extractor_sha256'] == REFERENCE_EXTRACTORS['shape_pairs'][1]
    assert set(predict_attributes(x[:1])[0]) == {'shape', 'colour', 'size', 'count', 'position'}   # default: shapes
    m = fidelity_metrics(x[:150], x[150:], extractor='shape_pairs', metrics=('fd', 'kid'))
    assert 'FD_shape_pairs' in m and 'KID_shape_pairs_mean' in m and m['n2'] == 150


def test_generation_metrics_on_shape_pairs(tmp_path):
    "A toy generation run on `shape_pairs`: FD against seeded test images, and how well samples show their class."
    from vtp_nbdev.flow import balanced_labels
    from vtp_nbdev.generate import GenerationEvalConfig, generation_metrics
    from vtp_nbdev.tokenizer import VTPModel, vtp_config
    t0 = time.perf_counter()
    torch.manual_seed(0)
    VTPModel(vtp_config('tiny', train_clip=False)).save_pretrained(tmp_path/'tok')
    cfg = GenerationEvalConfig(dataset='shape_pairs', n_latents=16, n_samples=40, n_ref=24, steps=3,
                               dit=dict(preset='tiny', steps=2, batch=8, log_every=1, ckpt_every=2))
    m = generation_metrics(tmp_path/'tok', cfg, runs_dir=tmp_path/'runs', device='cpu', progress=False)
    assert m['extractor'] == 'vtp-ref-shape_pairs' and m['FD_shape_pairs'] > 0 and m['n2'] == 24
    assert 0 <= m['sample_shape_accuracy'] <= 1 and 0 <= m['sample_colour_accuracy'] <= 1
    assert m['sample_accuracy_chance'] == dict(shape=1 / len(SHAPE_KINDS), colour=0.25)
    kept = torch.load(next((tmp_path/'runs').rglob('samples_*.pt')))
    assert kept['labels'].tolist() == balanced_labels(40, 20).tolist()                   # the requested classes
    print(f"shape_pairs generation metrics: {time.perf_counter() - t0:.1f} s")
