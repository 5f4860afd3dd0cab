"""Tests of evaluate.py: every metric against a reference implementation, then the script end to end.

    python -m pytest tests/test_evaluate.py -q
"""
import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
from tests.conftest import run_here, run_script, run_torchrun  # noqa: E402
from tests.test_faults import make_folder  # noqa: E402
import data  # noqa: E402
import evaluate as E  # noqa: E402
import model  # noqa: E402

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-5k"
CPU = common.Proc(0, 1, torch.device("cpu"), torch.float32)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread in this process (restored afterwards for other test files): on a small shared CPU box, OpenMP
    threads spin-waiting for a busy core made these runs 5x slower (measured); no test number depends on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- Hungarian, cluster accuracy, NMI, ARI ----
def brute_force_cost(cost):
    n, m = cost.shape
    if n > m:
        return brute_force_cost(cost.T)
    return min(sum(cost[i, j] for i, j in enumerate(p)) for p in itertools.permutations(range(m), n))


def check_assignment(cost, rows, cols):
    assert len(rows) == len(cols) == min(cost.shape)
    assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
    assert list(rows) == sorted(rows)


def test_hungarian_equals_brute_force():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (1, 4), (4, 1), (2, 3), (3, 2), (4, 4), (5, 3), (3, 6), (6, 6), (6, 5)]:
        for integer in (False, True):  # integer costs have ties
            cost = rng.integers(0, 5, shape) if integer else rng.normal(size=shape)
            rows, cols = E.hungarian(cost)
            check_assignment(cost, rows, cols)
            assert cost[rows, cols].sum() == pytest.approx(brute_force_cost(cost), abs=1e-9), shape


def test_hungarian_equals_scipy():
    scipy_opt = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(1)
    for shape in [(40, 40), (25, 60), (70, 15), (100, 100)]:
        for cost in (rng.random(shape), rng.integers(0, 10, shape)):
            rows, cols = E.hungarian(cost)
            check_assignment(cost, rows, cols)
            r, c = scipy_opt.linear_sum_assignment(cost)
            assert cost[rows, cols].sum() == pytest.approx(cost[r, c].sum(), abs=1e-9)


def test_nmi_ari_equal_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(2)
    cases = [(rng.integers(0, ka, n), rng.integers(0, kb, n)) for n, ka, kb in
             [(50, 3, 3), (200, 10, 7), (1000, 20, 20), (30, 30, 2), (500, 1, 5)]]
    y = rng.integers(0, 5, 100)
    cases += [(y, y), (y, (y + 1) % 5), (np.zeros(10, int), np.zeros(10, int)), (np.arange(10), np.arange(10))]
    cases += [(y, np.where(rng.random(100) < 0.3, rng.integers(0, 5, 100), y))]  # a noisy copy
    for a, b in cases:
        assert E.nmi(a, b) == pytest.approx(metrics.normalized_mutual_info_score(a, b), abs=1e-10)
        assert E.ari(a, b) == pytest.approx(metrics.adjusted_rand_score(a, b), abs=1e-10)
    a, b = cases[1]  # torch tensors work too
    assert E.nmi(torch.tensor(a), torch.tensor(b)) == pytest.approx(metrics.normalized_mutual_info_score(a, b))


def test_cluster_acc():
    y = torch.randint(0, 10, (300,), generator=torch.Generator().manual_seed(0))
    relabel = torch.randperm(10, generator=torch.Generator().manual_seed(1)) + 100
    assert E.cluster_acc(y, relabel[y]) == 1.0
    assert E.cluster_acc([0, 0, 1, 1], [5, 5, 5, 7]) == 0.75
    assert E.cluster_acc([0, 0, 0, 1, 1, 1], [0, 1, 2, 0, 1, 2]) == pytest.approx(2 / 6)  # 3 clusters, 2 classes


def blobs(n_per, k, dim, seed, spread=0.1, noise_seed=None):
    """k Gaussian blobs (centres fixed by seed, noise by noise_seed) -> (x (k*n_per, dim), y)."""
    centres = torch.randn(k, dim, generator=torch.Generator().manual_seed(seed)) * 5
    y = torch.arange(k).repeat_interleave(n_per)
    g = torch.Generator().manual_seed(seed if noise_seed is None else noise_seed)
    return centres[y] + spread * torch.randn(len(y), dim, generator=g), y


def test_kmeans_recovers_blobs():
    x, y = blobs(60, 6, 16, seed=0)
    for seed in range(3):
        centres, assign = E.kmeans(x, 6, seed=seed)
        assert E.cluster_acc(y, assign) == 1.0
        assert torch.equal(E.nearest(x, centres), assign)


def test_kmeans_ends_at_a_lloyd_fixed_point():
    """On overlapping blobs, where the seeding alone is far from the answer: every centre is the mean of its points
    and every point is assigned to its nearest centre (k-means that stopped after its seeding passes the blob test
    above, whose blobs k-means++ seeds one each)."""
    x, _ = blobs(100, 5, 8, seed=1, spread=4.0)
    for seed in range(2):
        centres, assign = E.kmeans(x, 5, seed=seed)
        for j in range(5):
            torch.testing.assert_close(centres[j], x[assign == j].mean(dim=0))
        assert torch.equal(E.nearest(x, centres), assign)


def test_nearest_is_the_euclidean_argmin():
    """k-means assigns by |q - c|^2 = |q|^2 - 2 q.c + |c|^2; the k-means test above compares nearest() with itself."""
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(500, 8, generator=g), torch.randn(10, 8, generator=g) * 2
    exact = torch.cdist(x, c, compute_mode="donot_use_mm_for_euclid_dist")  # pairwise differences, not the expansion
    assert torch.equal(E.nearest(x, c), exact.argmin(dim=1))
    assert torch.equal(E.nearest(x, c, chunk=64), E.nearest(x, c))


def test_run_metrics_reports_the_best_lr_the_mean_and_the_best_k_means_run(monkeypatch):
    """Which number goes where: the probe's best lr (and its accuracy), the best lr of the 1% and 10% probes, one
    k-means run per seed (seed, seed + 1, ...), mean ACC/NMI/ARI over the runs and the ACC-best run's own NMI/ARI.
    The probe and the clustering scores are scripted, so each key has a value no other choice would give."""
    tr, ytr = blobs(50, 4, 6, seed=0)
    va, yva = blobs(20, 4, 6, seed=0, noise_seed=3)
    probes = {200: [10.0, 70.0, 30.0], 4: [1.0, 2.0, 3.0], 20: [4.0, 6.0, 5.0]}  # by train size: all, 1%, 10%
    monkeypatch.setattr(E, "linear_probe", lambda f, y, *a: probes[len(y)])
    seeds = []

    def kmeans(x, k, seed):  # records the seed; any centres will do, the scores below are scripted
        seeds.append(seed)
        return x[:k], None
    monkeypatch.setattr(E, "kmeans", kmeans)
    acc, nmi, ari = iter([0.4, 0.6]), iter([0.9, 0.25]), iter([0.1, 0.35])  # run 1, run 2 (the ACC-best)
    monkeypatch.setattr(E, "cluster_acc", lambda y, a: next(acc))
    monkeypatch.setattr(E, "nmi", lambda y, a: next(nmi))
    monkeypatch.setattr(E, "ari", lambda y, a: next(ari))
    args = argparse.Namespace(kmeans_seeds=2, seed=7, probe_lrs=[0.1, 1.0, 3.0], probe_epochs=1, probe_batch=32)
    res, _ = E.run_metrics(tr, ytr, va, yva, 4, args, ["linear", "kmeans"])
    assert (res["linear"], res["linear_lr"], res["pct1"], res["pct10"]) == (70.0, 1.0, 3.0, 6.0)
    assert seeds == [7, 8]
    assert (res["kmeans_acc_mean"], res["nmi"], res["ari"]) == pytest.approx((50, 57.5, 22.5))
    assert (res["kmeans_acc_best"], res["nmi_best"], res["ari_best"]) == pytest.approx((60, 25, 35))


def test_run_metrics_scores_every_probe_on_the_val_features(monkeypatch):
    """The probes (all, 1%, 10% of train) are fit on raw train rows and scored on the raw val set, never on train."""
    tr, ytr = blobs(50, 4, 6, seed=0)
    va, yva = blobs(20, 4, 6, seed=0, noise_seed=3)  # 200 train, 80 val: train cannot pass for val
    calls = []

    def linear_probe(f, y, val_f, val_y, *a):  # records what each probe is given
        calls.append((f, y, val_f, val_y))
        return [50.0]
    monkeypatch.setattr(E, "linear_probe", linear_probe)
    args = argparse.Namespace(seed=0, probe_lrs=[0.1], probe_epochs=1, probe_batch=32)
    E.run_metrics(tr, ytr, va, yva, 4, args, ["linear"])
    assert [len(y) for _, y, _, _ in calls] == [200, 4, 20]
    assert torch.equal(calls[0][0], tr) and torch.equal(calls[0][1], ytr)
    assert all(torch.equal(val_f, va) and torch.equal(val_y, yva) for _, _, val_f, val_y in calls)


def test_run_metrics_scores_k_means_on_the_val_set(monkeypatch):
    """k-means is fit on train and scored on val: ACC, NMI and ARI get the val labels and the val assignment."""
    tr, ytr = blobs(50, 4, 6, seed=0)
    va, yva = blobs(20, 4, 6, seed=0, noise_seed=3)  # 200 train, 80 val
    calls = []
    for name in ("cluster_acc", "nmi", "ari"):  # spies around the real scores
        real = getattr(E, name)
        monkeypatch.setattr(E, name, lambda y, a, name=name, real=real: (calls.append((name, y, a)), real(y, a))[1])
    E.run_metrics(tr, ytr, va, yva, 4, argparse.Namespace(kmeans_seeds=2, seed=0), ["kmeans"])
    trn, van = E.standardise(tr, va)
    assigns = [E.nearest(van, E.kmeans(trn, 4, seed=s)[0]) for s in (0, 1)]
    assert [c[0] for c in calls] == ["cluster_acc", "nmi", "ari"] * 2
    assert all(torch.equal(y, yva) and torch.equal(a, assigns[i // 3]) for i, (_, y, a) in enumerate(calls))


def test_lowshot_fits_the_standardised_features_of_three_fixed_splits(monkeypatch):
    tr, ytr = blobs(50, 4, 6, seed=0)
    va, yva = blobs(20, 4, 6, seed=0, noise_seed=3)
    tr, va = tr + 50, va + 50  # off-centre: standardising changes them
    splits, fits = [], []
    real = E.fewshot_indices

    def fewshot_indices(y, n, seed):  # records each split asked for
        splits.append((n, seed))
        return real(y, n, seed)

    def logistic_regression(train_f, y, test_f, num_classes, l2):  # records the features it is given
        fits.append((train_f, test_f))
        return torch.zeros(len(test_f), dtype=torch.long)
    monkeypatch.setattr(E, "fewshot_indices", fewshot_indices)
    monkeypatch.setattr(E, "logistic_regression", logistic_regression)
    E.run_metrics(tr, ytr, va, yva, 4, argparse.Namespace(lowshot_l2=1e-3), ["lowshot"])
    trn, van = E.standardise(tr, va)
    assert splits == [(shots, split) for shots in (1, 2, 5) for split in range(3)]
    assert all(torch.equal(b, van) for _, b in fits)
    assert torch.equal(fits[0][0], trn[real(ytr, 1, 0)])


def hidden_classes(noise_seed):
    """Features whose classes show only after standardising: four classes in six small dimensions, under a large
    offset and beside one loud noise dimension. The same class centres for every noise_seed (train and val)."""
    x, y = blobs(50, 4, 6, seed=0, noise_seed=noise_seed)
    loud = 100 * torch.randn(len(y), 1, generator=torch.Generator().manual_seed(noise_seed))
    return torch.cat([0.01 * x, loud], dim=1) + 50, y


def test_run_metrics_gives_k_nn_and_k_means_the_train_standardised_features(monkeypatch):
    """run_metrics standardises with the train statistics before k-NN and k-means, and fits k-means on the train
    features only. The classes live in six small dimensions under a large offset and one loud noise dimension, so
    cosine k-NN on the raw features is near chance and on the standardised ones near perfect."""
    (tr, ytr), (va, yva) = hidden_classes(1), hidden_classes(2)
    real, fits = E.kmeans, []
    monkeypatch.setattr(E, "kmeans", lambda x, k, seed: (fits.append(x), real(x, k, seed=seed))[1])
    args = argparse.Namespace(knn_k=[10], chunk=64, kmeans_seeds=2, seed=0)
    res, _ = E.run_metrics(tr, ytr, va, yva, 4, args, ["knn", "kmeans"])
    trn, van = E.standardise(tr, va)
    assert res["knn10"] == E.accuracy(E.knn_predict(trn, ytr, van, 10, 4), yva) > 90
    raw = E.accuracy(E.knn_predict(F.normalize(tr, dim=1), ytr, F.normalize(va, dim=1), 10, 4), yva)
    assert raw < 50, raw  # so a k-NN on the unstandardised features would show
    assert len(fits) == 2 and all(torch.equal(f, trn) for f in fits)  # k-means is fit on train, standardised
    accs = [100 * E.cluster_acc(yva, E.nearest(van, real(trn, 4, seed=s)[0])) for s in (0, 1)]
    assert res["kmeans_acc_mean"] == pytest.approx(np.mean(accs))  # and scored on val


def test_linear_probe_scores_each_val_image_on_its_own():
    """At test time the probe's BatchNorm uses the running statistics of training (eval mode), so an image's
    prediction does not depend on the other val images scored with it: one at a time gives the same accuracy."""
    tr, ytr = blobs(40, 4, 8, seed=0, spread=4.0, noise_seed=1)  # overlapping classes: not every image right
    va, yva = blobs(10, 4, 8, seed=0, spread=4.0, noise_seed=2)
    full = E.linear_probe(tr, ytr, va, yva, 4, [0.1], 5, 32)
    singles = [E.linear_probe(tr, ytr, va[i:i + 1], yva[i:i + 1], 4, [0.1], 5, 32)[0] for i in range(len(va))]
    assert 0 < full[0] < 100 and full[0] == pytest.approx(np.mean(singles))


# ---- k-NN ----
def knn_loop(train_f, train_y, test_f, k, num_classes, T=0.07):
    preds = []
    for q in test_f.tolist():
        sims = [sum(a * b for a, b in zip(q, t)) for t in train_f.tolist()]
        top = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in top:
            votes[int(train_y[i])] += np.exp(sims[i] / T)
        preds.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    return torch.tensor(preds)


def test_standardise_uses_the_train_statistics():
    """The val features are centred and scaled with the train set's mean and std, not their own."""
    g = torch.Generator().manual_seed(0)
    train_f = torch.randn(200, 4, generator=g) * torch.tensor([1.0, 2.0, 3.0, 4.0]) + 5
    val_f = torch.randn(50, 4, generator=g) + 10
    _, val_n = E.standardise(train_f, val_f)
    expected = F.normalize((val_f - train_f.mean(0)) / (train_f.std(0) + 1e-6), dim=1)
    assert torch.allclose(val_n, expected, atol=1e-6)
    assert not torch.allclose(val_n, E.standardise(val_f)[0], atol=1e-2)  # its own statistics give other features
    train_f[:, 2] = 7.0  # a dead feature (std 0) stays finite instead of turning every feature into NaN
    assert all(torch.isfinite(f).all() for f in E.standardise(train_f, val_f))


def test_metric_defaults_are_the_documented_ones():
    """k = 10 (the authors' code) and 20 (DINO), 10 k-means restarts, the probe's lr sweep: results.json numbers
    are comparable across runs only while these stay as README and RESULTS.md give them."""
    a = E.parse_args(["--init_from", "x"])
    assert (a.knn_k, a.kmeans_seeds, a.probe_epochs) == ([10, 20], 10, 100)
    assert a.probe_lrs == [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]


def test_knn_equals_loop_and_chunking():
    g = torch.Generator().manual_seed(0)
    train_f, test_f = torch.randn(150, 8, generator=g), torch.randn(40, 8, generator=g)
    train_y = torch.randint(0, 5, (150,), generator=g)
    train_n, test_n = E.standardise(train_f, test_f)
    assert torch.allclose(train_n.norm(dim=1), torch.ones(150))
    for k in (1, 5, 20):
        ref = knn_loop(train_n, train_y, test_n, k, 5)
        assert torch.equal(E.knn_predict(train_n, train_y, test_n, k, 5, chunk=1000), ref)
        assert torch.equal(E.knn_predict(train_n, train_y, test_n, k, 5, chunk=7), ref)
    # a query that is a copy of a training point is classified as that point with k=1
    assert torch.equal(E.knn_predict(train_n, train_y, train_n[:30], 1, 5), train_y[:30])


# ---- linear probe and low-shot ----
def test_linear_probe_equals_torch_sgd_with_autograd():
    """The probe's hand-written step (softmax - one-hot gradient, momentum 0.9, 10% warm-up + cosine, BatchNorm
    without affine on the batch) equals torch.optim.SGD on autograd's gradient of the same model from the same
    draws: initial weights, then one permutation per epoch. Off-centre, overlapping classes, so a wrong gradient,
    momentum, schedule or normalisation changes the val accuracy. At most one val image may differ (rounding)."""
    def reference(tr, ytr, va, yva, classes, lr, epochs, bs):
        g = torch.Generator().manual_seed(0)
        bn = torch.nn.BatchNorm1d(tr.shape[1], affine=False)
        W = (torch.randn(1, tr.shape[1], classes, generator=g) * 0.01)[0].requires_grad_()
        b = torch.zeros(classes, requires_grad=True)
        opt = torch.optim.SGD([W, b], lr=lr, momentum=0.9)
        steps = len(tr) // bs
        total = epochs * steps
        for step in range(total):
            if step % steps == 0:
                perm = torch.randperm(len(tr), generator=g)
            i = perm[step % steps * bs:(step % steps + 1) * bs]
            opt.zero_grad()
            F.cross_entropy(bn(tr[i]) @ W + b, ytr[i]).backward()
            opt.param_groups[0]["lr"] = lr * common.lr_at(step, total, int(0.1 * total), 1.0)
            opt.step()
        bn.eval()
        with torch.no_grad():
            return E.accuracy((bn(va) @ W + b).argmax(dim=1), yva)
    tr, ytr = blobs(100, 5, 16, seed=0, spread=6.0, noise_seed=1)
    va, yva = blobs(100, 5, 16, seed=0, spread=6.0, noise_seed=2)
    tr, va = tr * 3 + 20, va * 3 + 20
    for lr in (0.03, 0.3, 3.0):
        got, = E.linear_probe(tr, ytr, va, yva, 5, [lr], 4, 32)
        want = reference(tr, ytr, va, yva, 5, lr, 4, 32)
        assert 30 < want < 100 and abs(got - want) <= 100 / len(yva) + 1e-9, (lr, got, want)


def test_linear_probe_separable():
    x, y = blobs(100, 4, 16, seed=1, spread=1.0)
    xv, yv = blobs(50, 4, 16, seed=1, spread=1.0, noise_seed=99)  # same centres, new noise
    accs = E.linear_probe(x, y, xv, yv, 4, [0.01, 0.1, 1.0], epochs=20, batch_size=64)
    assert len(accs) == 3 and max(accs) >= 99.0
    shuffled = E.linear_probe(x, y, xv, yv[torch.randperm(len(yv))], 4, [0.1], epochs=20, batch_size=64)
    assert shuffled[0] < 60  # it really compares predictions with labels


def test_fewshot_splits():
    g = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([20, 7, 13, 30])])[torch.randperm(70, generator=g)]
    for n in (1, 2, 5):
        idx = E.fewshot_indices(labels, n, seed=3)
        assert torch.equal(torch.bincount(labels[idx], minlength=4), torch.full((4,), n))
        assert torch.equal(idx, E.fewshot_indices(labels, n, seed=3))  # fixed by seed
        assert len(set(idx.tolist())) == len(idx)
    assert not torch.equal(E.fewshot_indices(labels, 5, seed=0), E.fewshot_indices(labels, 5, seed=1))
    frac = E.fewshot_indices(labels, 0.1, seed=0)
    assert torch.bincount(labels[frac], minlength=4).tolist() == [2, 1, 1, 3]  # round(10%), at least one
    odd = torch.tensor([0] * 18 + [1] * 12)  # 1.8 and 1.2 images: rounded to 2 and 1 (floor would give 1 and 1)
    assert torch.bincount(odd[E.fewshot_indices(odd, 0.1, seed=0)]).tolist() == [2, 1]


def test_lowshot_logistic_regression():
    x, y = blobs(40, 5, 16, seed=2, spread=1.0)
    xn, = E.standardise(x)
    i = E.fewshot_indices(y, 2, seed=0)
    pred = E.logistic_regression(xn[i], y[i], xn, 5, l2=1e-3)
    assert E.accuracy(pred, y) == 100.0
    assert E.accuracy(pred, y.flip(0)) < 50



@pytest.mark.parametrize("l2", [1e-3, 0.3])
def test_logistic_regression_matches_sklearn(l2):
    """The low-shot classifier is the exact optimum of mean cross-entropy + l2/2 |W|^2 with the bias unpenalised:
    sklearn's multinomial LogisticRegression solves the same problem with C = 1/(l2 n). Four overlapping classes, so
    the L2 weight, the mean (not sum) loss, the free bias and convergence all move the boundary."""
    from sklearn.linear_model import LogisticRegression
    x, y = blobs(115, 4, 8, seed=3, spread=4.0)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    (xtr, xte), (ytr, yte) = x.split([60, 400]), y.split([60, 400])
    pred = E.logistic_regression(xtr, ytr, xte, 4, l2=l2)
    ref = LogisticRegression(C=1 / (l2 * len(ytr)), tol=1e-10, max_iter=10000).fit(xtr.double().numpy(), ytr.numpy())
    ref_pred = torch.from_numpy(ref.predict(xte.double().numpy()))
    assert 60 < E.accuracy(ref_pred, yte) < 95  # overlapping: the boundary matters
    assert (pred != ref_pred).sum() <= 2

# ---- features ----
def test_extract_features_in_dataset_order():
    sub = first_n(data.load_split("synthetic", None, "val", 32), 301)  # 301: a short last batch
    fn = lambda x: x.mean(dim=(2, 3))  # (B, C): identifies each image
    feats, labels = E.extract_features(fn, sub, 32, CPU, batch_size=64)
    ref = data._normalize(sub.images.float() / 255, sub.mean, sub.std).mean(dim=(2, 3))
    assert torch.allclose(feats, ref, atol=1e-5) and torch.equal(labels, sub.labels)


def test_extract_features_progress_lines(monkeypatch, capsys):
    monkeypatch.setattr(E, "PROGRESS_EVERY", -1)  # a line after every batch
    sub = first_n(data.load_split("synthetic", None, "val", 32), 130)
    E.extract_features(lambda x: x.mean(dim=(2, 3)), sub, 32, CPU, batch_size=64, desc="train")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" |")[0] for line in lines] == ["train: 64/130 images", "train: 128/130 images",
                                                        "train: 130/130 images"]
    assert all("img/s | ETA" in line for line in lines)
    E.extract_features(lambda x: x.mean(dim=(2, 3)), sub, 32, CPU, batch_size=64)  # without desc: silent
    assert capsys.readouterr().out == ""


def test_extract_features_file_backed_keeps_the_last_partial_batch(tmp_path):
    """An image folder read from disk (not held in memory): 5 images in batches of 4 give 5 rows, in dataset order.
    Each image is one flat colour, so its mean-pooled eval view is that colour, normalised."""
    from PIL import Image
    colours = [(10, 200, 0), (50, 170, 7), (90, 140, 14), (130, 110, 21), (170, 80, 28)]
    for i, rgb in enumerate(colours):  # 3 of class a, 2 of class b
        path = tmp_path / "train" / "ab"[i // 3] / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), rgb).save(path)
    (tmp_path / "val").mkdir()
    files = data.load_split("imagefolder", str(tmp_path), "train", 32, in_memory=False)
    assert files.images is None
    feats, labels = E.extract_features(lambda x: x.mean(dim=(2, 3)), files, 32, CPU, batch_size=4, num_workers=0)
    ref = data._normalize(torch.tensor(colours).float().view(5, 3, 1, 1) / 255, files.mean, files.std)
    torch.testing.assert_close(feats, ref.view(5, 3), atol=1e-4, rtol=0)
    assert labels.tolist() == [0, 0, 0, 1, 1]


def first_n(imageset, n):
    """The first n images of an in-memory ImageSet."""
    return dataclasses.replace(imageset, images=imageset.images[:n], labels=imageset.labels[:n])


def test_knn_eval_standardises_like_evaluate(monkeypatch):
    """The training scripts' --eval_every k-NN scores the features as evaluate.py does: standardised with the train
    statistics (one standardise call given train and val)."""
    (tr, ytr), (va, yva) = hidden_classes(1), hidden_classes(2)
    feats = iter([(tr, ytr), (va, yva)])
    monkeypatch.setattr(E, "extract_features", lambda *a, **k: next(feats))
    calls, real = [], E.standardise

    def standardise(*features):
        calls.append(features)
        return real(*features)
    monkeypatch.setattr(E, "standardise", standardise)
    enc = torch.nn.Linear(1, 1)  # stands in for the encoder: extraction is scripted
    enc.grid, enc.patch_size = 8, 4
    split = argparse.Namespace(classes=list(range(4)))
    assert E.knn_eval(enc, split, split, CPU, ks=(10,))["knn10"] > 90  # raw cosine k-NN: < 50 (test above)
    assert len(calls) == 1 and len(calls[0]) == 2 and torch.equal(calls[0][0], tr) and torch.equal(calls[0][1], va)


def test_knn_eval_restores_mode_and_ignores_decoder():
    cfg = model.model_config("vit_nano", 32, 4, 3)
    mae = model.init_weights(model.MaskedAutoencoder(**cfg)).train()  # forward() of an MAE is its loss
    tr = first_n(data.load_split("synthetic", None, "train", 32), 400)
    va = first_n(data.load_split("synthetic", None, "val", 32), 200)
    res = E.knn_eval(mae, tr, va, CPU, pooling="cls", ks=(1, 10), batch_size=128)
    assert set(res) == {"knn1", "knn10"} and all(0 <= v <= 100 for v in res.values())
    assert mae.training


DDP_SCRIPT = """
import sys, dataclasses, torch
sys.path.insert(0, sys.argv[1])
import common, data, evaluate as E
import argparse
args = argparse.Namespace(device="cpu", precision="fp32", compile=0, batch_size=64, seed=0)
proc = common.setup(args)
s = data.load_split("synthetic", None, "val", 32)
s = dataclasses.replace(s, images=s.images[:203], labels=s.labels[:203])  # uneven shards, short last batch
feats, labels = E.extract_features(lambda x: x.mean(dim=(2, 3)), s, 32, proc, batch_size=64)
ref = data._normalize(s.images.float() / 255, s.mean, s.std).mean(dim=(2, 3))
assert torch.allclose(feats, ref, atol=1e-5), "features out of order"
assert torch.equal(labels, s.labels)
one = dataclasses.replace(s, images=s.images[:1], labels=s.labels[:1])  # fewer images than ranks: refused on both
try:
    E.extract_features(lambda x: x.mean(dim=(2, 3)), one, 32, proc, desc="val")
    raise AssertionError("one image on two ranks was not refused")
except common.UserError as e:
    assert "val has 1 images, fewer than the 2 processes" in str(e), e
torch.distributed.destroy_process_group()
print("ok", proc.rank)
"""


def test_extract_features_two_processes(tmp_path):
    """Under torchrun (gloo), the gathered features come back in dataset order on every rank; a split with fewer
    images than ranks is refused on every rank (one rank would otherwise wait for the other's gather forever)."""
    script = tmp_path / "ddp_extract.py"
    script.write_text(DDP_SCRIPT)
    r = run_torchrun(script, ROOT, timeout=120)  # --standalone: a free rendezvous port
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("ok") == 2


# ---- end to end ----
# The same `python evaluate.py ...` command, run in this process (conftest.run_here: no 4-second torch import per
# run). Synthetic runs use smaller generated sets (1000 train / 300 val instead of 5000 / 1000) so the file stays fast.
def run_eval(*args, small=True):
    sizes = dict(data.SYNTHETIC_SIZES)
    if small:
        data.SYNTHETIC_SIZES.update(train=1000, val=300)
    try:
        return run_here("evaluate.py", "--device", "cpu", "--num_workers", "0", *args)
    finally:
        data.SYNTHETIC_SIZES.update(sizes)


def train_encoder_supervised(mae, epochs=2):
    """Two epochs of supervised training (a linear head on mean-pooled features, patch 8: 16 tokens, so about
    4 s): a cheap and reliably 'trained' encoder, synthetic k-NN@20 94-97% vs 38-40% for random inits (3 seeds
    each, measured on the tiled shapes). A short MAE run does not do: after 200 steps (patch 4) its k-NN on the
    untiled shapes of before session 11 was still below a random encoder's (13% vs 18%), and a longer one does not
    fit this file's time budget."""
    torch.manual_seed(0)
    tr = data.load_split("synthetic", None, "train", 32)
    head = torch.nn.Linear(mae.cls_token.shape[-1], 10)
    opt = torch.optim.AdamW([*mae.parameters(), *head.parameters()], lr=3e-3)
    loader = data.ViewLoader(tr, 64, "eval", 1, 32, "cpu", num_workers=0)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for _, (x,), y in loader:
            loss = F.cross_entropy(head(E.pool(mae.forward_features(x), "mean")), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return mae


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Checkpoints in the project's formats, built from model objects: stage-1 MAE (random), stage-2 head with
    small dims, an official-format encoder file (same weights as the MAE), and a 'trained' stage-1 file."""
    d = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    cfg = model.model_config("vit_nano", 32, 8, 3)  # patch 8: 16 tokens, fast on a CPU
    mae = model.init_weights(model.MaskedAutoencoder(**cfg))
    common.save_checkpoint(d / "mae" / "ckpt.pt", stage="mae", config=cfg, model=mae.state_dict(), step=0,
                           args={"dataset": "synthetic", "data_path": None})
    head_args = dict(dataset="synthetic", pooling="mean", proj_hidden=64, proj_dim=32, pred_hidden=64, queue_size=256)
    mc = model.MAECT(cfg, 256, "mean", 64, 32, 64)
    model.init_weights(mc.head)
    mc.encoder.load_state_dict(model.encoder_state_dict(mae.state_dict()))
    common.save_checkpoint(d / "head" / "ckpt.pt", stage="head", config=cfg, model=mc.state_dict(), args=head_args)
    torch.save({"model": model.encoder_state_dict(mae.state_dict())}, d / "official.pth")
    trained = train_encoder_supervised(model.init_weights(model.MaskedAutoencoder(**cfg)))
    common.save_checkpoint(d / "trained" / "ckpt.pt", stage="mae", config=cfg, model=trained.state_dict(),
                           args={"dataset": "synthetic"})
    return d


@pytest.fixture(scope="module")
def mae_synthetic(ckpts):
    """The random stage-1 checkpoint evaluated on the synthetic set with every metric (reduced settings)."""
    r = run_eval("--init_from", ckpts / "mae" / "ckpt.pt", "--probe_epochs", 5, "--kmeans_seeds", 2, "--batch_size", 500)
    assert r.returncode == 0, r.stderr[-3000:]
    out = ckpts / "mae" / "eval"
    return json.loads((out / "results.json").read_text()), out, r.stdout


def check_keys(res):
    for k in E.KEYS:
        assert k in res and res[k] is not None, k
        if k != "linear_lr":
            assert -100 <= res[k] <= 100, (k, res[k])
    for k in ("dataset", "checkpoint", "stage", "pooling", "features", "feature_dim", "seconds", "num_classes",
              "n_train", "n_val"):
        assert k in res, k


def test_e2e_mae_both_poolings(mae_synthetic):
    res, out, stdout = mae_synthetic
    check_keys(res)
    for p in ("cls", "mean"):
        check_keys(res[p])
        assert res[p]["pooling"] == p
    assert res["pooling"] == model.PRESETS["vit_nano"]["pooling"] == "mean"
    assert res["knn20"] == res["mean"]["knn20"] and res["stage"] == "mae" and res["feature_dim"] == 64
    assert res["dataset"] == "synthetic"  # taken from the checkpoint's args
    assert (out / "knn_grid.png").stat().st_size > 0 and (out / "clusters.png").stat().st_size > 0
    assert "knn10" in stdout and "mean pooling" in stdout


def test_e2e_head_predictor(ckpts, tmp_path):
    r = run_eval("--init_from", ckpts / "head" / "ckpt.pt", "--features", "predictor", "--metrics", "knn,kmeans",
                 "--kmeans_seeds", 1, "--batch_size", 500, "--out_dir", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["stage"] == "head" and res["pooling"] == "mean" and res["features"] == "predictor"
    assert res["feature_dim"] == 32 and "cls" not in res
    assert res["knn10"] is not None and res["kmeans_acc_best"] is not None and res["linear"] is None
    assert not (tmp_path / "knn_grid.png").exists()


def test_e2e_official(ckpts, tmp_path, mae_synthetic):
    r = run_eval("--init_from", ckpts / "official.pth", "--dataset", "synthetic", "--metrics", "knn",
                 "--batch_size", 500, "--out_dir", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["stage"] == "official" and set(res) >= {"cls", "mean"}
    # the same encoder weights as the stage-1 checkpoint: the same k-NN numbers
    assert res["cls"]["knn10"] == pytest.approx(mae_synthetic[0]["cls"]["knn10"])


def test_e2e_the_authors_released_encoder_layout(ckpts, tmp_path, mae_synthetic):
    """An encoder in the layout of the MAE-CT authors' releases (ml-jku/MAE-CT `*.th`: {"state_dict", "ctor_kwargs"},
    no CLS row in pos_embed) evaluates as the same weights in our own stage-1 checkpoint do."""
    sd = model.encoder_state_dict(torch.load(ckpts / "mae" / "ckpt.pt", weights_only=True)["model"])
    sd["pos_embed"] = sd["pos_embed"][:, 1:]
    torch.save({"state_dict": sd, "ctor_kwargs": {"kind": "vit.masked_encoder", "attention_heads": 4}},
               tmp_path / "maect_nano8.th")
    r = run_eval("--init_from", tmp_path / "maect_nano8.th", "--dataset", "synthetic", "--metrics", "knn",
                 "--batch_size", 500, "--out_dir", tmp_path / "eval")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res["stage"] == "official"
    for p in ("cls", "mean"):
        assert res[p]["knn10"] == pytest.approx(mae_synthetic[0][p]["knn10"])
        assert res[p]["knn20"] == pytest.approx(mae_synthetic[0][p]["knn20"])
    # its config names the head count: a --num_heads against it is one error line, nothing written
    assert_user_error(run_eval("--init_from", tmp_path / "maect_nano8.th", "--dataset", "synthetic", "--num_heads", 2,
                               "--out_dir", tmp_path / "eval2"), "records 4 attention heads")
    assert not (tmp_path / "eval2").exists()


def test_results_json_is_whole_or_absent(ckpts, tmp_path, monkeypatch):
    """Stopped while results.json is written (here the disk fills up half-way): no results.json at all, since
    reproduce.sh takes an existing one as "evaluated already" and its table would fail on half a JSON."""
    def disk_full(obj, f, **kw):
        f.write('{"knn10": ')
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(json, "dump", disk_full)
    with pytest.raises(OSError, match="No space left"):
        run_eval("--init_from", ckpts / "official.pth", "--dataset", "synthetic", "--metrics", "knn",
                 "--batch_size", 500, "--out_dir", tmp_path)
    assert not (tmp_path / "results.json").exists()


def test_encoder_ema_evaluates_the_ema_weights(ckpts, tmp_path, mae_synthetic):
    """--encoder_ema evaluates the checkpoint's EMA encoder, not its online one: a stage-3 file whose online
    encoder is the random MAE's and whose EMA is the trained encoder scores as the trained one."""
    head = torch.load(ckpts / "head" / "ckpt.pt", weights_only=True)
    trained = torch.load(ckpts / "trained" / "ckpt.pt", weights_only=True)
    common.save_checkpoint(tmp_path / "ct.pt", stage="ct", config=head["config"], model=head["model"],
                           args=head["args"], encoder_ema=model.encoder_state_dict(trained["model"]))
    knn = lambda *a: run_eval("--metrics", "knn", "--batch_size", 500, "--out_dir", tmp_path / a[0], *a[1:])
    for r in (knn("ema", "--init_from", tmp_path / "ct.pt", "--encoder_ema"), knn("online", "--init_from", tmp_path / "ct.pt"),
              knn("trained", "--init_from", ckpts / "trained" / "ckpt.pt", "--pooling", "mean")):
        assert r.returncode == 0, r.stderr[-3000:]
    res = {d: json.loads((tmp_path / d / "results.json").read_text()) for d in ("ema", "online", "trained")}
    assert res["ema"]["encoder_ema"] and res["ema"]["knn10"] == res["trained"]["knn10"]
    assert res["online"]["knn10"] == mae_synthetic[0]["mean"]["knn10"] != res["trained"]["knn10"]


def test_trained_beats_random(ckpts, mae_synthetic, tmp_path):
    r = run_eval("--init_from", ckpts / "trained" / "ckpt.pt", "--metrics", "knn", "--pooling", "mean",
                 "--batch_size", 500, "--out_dir", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    trained, random = json.loads((tmp_path / "results.json").read_text()), mae_synthetic[0]["mean"]
    assert trained["knn20"] > random["knn20"] + 20, (trained["knn20"], random["knn20"])


@pytest.mark.skipif(not CIFAR.is_dir(), reason=f"shared data not found at {CIFAR}")
def test_e2e_cifar_imagefolder(ckpts, tmp_path):
    r = run_eval("--init_from", ckpts / "mae" / "ckpt.pt", "--dataset", "imagefolder", "--data_path", CIFAR,
                 "--probe_epochs", 5, "--kmeans_seeds", 2, "--batch_size", 500, "--out_dir", tmp_path, small=False)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    check_keys(res)
    check_keys(res["cls"])
    assert res["dataset"] == "imagefolder" and (tmp_path / "clusters.png").exists()
    assert (res["num_classes"], res["n_train"], res["n_val"]) == (10, 4000, 1000)
    assert '"train": "4000 images, 10 classes, in memory"' in r.stdout  # the config line says what was found
    for what in ("k-NN", "linear probe", "k-means (2 seeds)", "low-shot"):  # a line per metric, with its time
        assert f"  {what}" in r.stdout, what


# ---- bad input ----
def assert_user_error(r, text):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and text in lines[0], r.stderr


def test_bad_input_exit_code(ckpts, tmp_path):
    """The script's contract: one `error:` line on stderr, exit code 2, nothing written. Two cases as real processes
    (what reaches stderr there includes warnings and C++ output, which an in-process run does not capture)."""
    mae = ckpts / "mae" / "ckpt.pt"
    cpu = ["--device", "cpu", "--num_workers", "0"]
    assert_user_error(run_script("evaluate.py", *cpu, "--init_from", tmp_path / "nope.pt"), "not found")
    assert_user_error(run_script("evaluate.py", *cpu, "--init_from", mae, "--dataset", "imagefolder", "--data_path",
                                 tmp_path / "nodata", "--out_dir", tmp_path), "does not exist")
    assert_user_error(run_eval("--init_from", mae, "--knn_k", 100000, "--out_dir", tmp_path), "larger than the training set")
    assert not any(tmp_path.iterdir())


def test_bad_input_messages(ckpts, tmp_path, monkeypatch):
    """The other refusals, in-process (the same main(); main_guard turns these into the line above)."""
    mae, official = ckpts / "mae" / "ckpt.pt", ckpts / "official.pth"
    cases = [([mae, "--features", "projector"], "stage-2/3"), ([mae, "--encoder_ema"], "EMA"),
             ([mae, "--dataset", "fashion_mnist"], "does not fit"), ([mae, "--img_size", 64], "does not fit"),
             ([official], "pass --dataset"), ([mae, "--metrics", "knn,cluster"], "unknown --metrics"),
             ([mae, "--num_heads", 2], "trained with 4 heads"), ([official, "--num_heads", 3], "does not divide"),
             ([mae, "--out_dir", tmp_path / "a_file" / "eval"], "is a file")]  # refused before any work
    (tmp_path / "a_file").write_text("")
    for extra, text in cases:
        monkeypatch.setattr(sys, "argv", ["evaluate.py", "--device", "cpu", "--out_dir", str(tmp_path),
                                          "--init_from", *map(str, extra)])
        with pytest.raises((common.UserError, data.DataError), match=text):  # one contract: main_guard's line
            E.main()
    # a val/ class that train/ lacks: data.py refuses it (generated images, so this runs without ../shared/data)
    make_folder(tmp_path / "data", classes=("airplane", "cat"), val_classes=("airplane", "dog"))
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--device", "cpu", "--out_dir", str(tmp_path / "eval"),
                                      "--init_from", str(mae), "--dataset", "imagefolder", "--img_size", "32",
                                      "--data_path", str(tmp_path / "data")])
    with pytest.raises(data.DataError, match="dog"):
        E.main()
    assert not (tmp_path / "eval").exists() and not (tmp_path / "results.json").exists()


def test_fewer_images_than_processes_is_refused_before_any_extraction(ckpts, tmp_path, monkeypatch):
    """A val split smaller than the number of processes is refused up front, on every rank alike (the check needs
    only the split's length), not after the train split's features took their minutes. Two ranks are faked by
    the world size that setup reports; the refusal comes before anything talks to another rank."""
    setup = common.setup
    monkeypatch.setattr(common, "setup", lambda args: dataclasses.replace(setup(args), world=2))
    monkeypatch.setattr(data, "SYNTHETIC_SIZES", {**data.SYNTHETIC_SIZES, "train": 64, "val": 1})
    monkeypatch.setattr(E, "extract_features", lambda *a, **k: pytest.fail("features were extracted"))
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--device", "cpu", "--out_dir", str(tmp_path / "eval"),
                                      "--init_from", str(ckpts / "mae" / "ckpt.pt"), "--knn_k", "1"])
    with pytest.raises(common.UserError, match="val has 1 images, fewer than the 2 processes"):
        E.main()
    assert not (tmp_path / "eval").exists()


def test_kmeans_keeps_the_centre_of_a_cluster_that_empties():
    """3 distinct points (5 copies each) and k = 4: one cluster must empty. Its centre stays where it was (a data
    point), not at the origin, where it would steal points from the others."""
    pts = torch.repeat_interleave(torch.randn(3, 6, generator=torch.Generator().manual_seed(0)) + 20, 5, dim=0)
    for seed in range(5):
        centres, _ = E.kmeans(pts, 4, seed=seed)
        assert torch.cdist(centres, pts).min(dim=1).values.max() < 1e-4, seed
