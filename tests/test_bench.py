"""bench.py runs in its CI-sized CPU form and prints a row per stage with finite, positive throughput."""
import json

from model import PRESETS
from tests.conftest import run_script


def test_bench_cpu_smoke(tmp_path):
    out = tmp_path / "bench.json"
    r = run_script("bench.py", "--device", "cpu", "--stages", "mae,head,ct,features", "--queue_size", "256",
                   "--steps", "1", "--runs", "1", "--warmup", "1", "--end_to_end", "synthetic", "--ct_views", "aug",
                   "--baseline", "--json", out, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["name"].split(" (")[0] for row in rows] == [
        "mae", "head init", "contrastive tuning", "feature extraction", "mae, official recipe as shipped",
        "mae end-to-end on synthetic", "contrastive tuning end-to-end on synthetic"]  # (no compiled rows on CPU)
    assert "two aug views" in rows[-1]["name"]  # stage 3 end to end with the colour pipeline (MAE-CT_aug)
    assert "FAILED" not in r.stdout
    assert all(row["img_s"] > 0 and row["step_ms"] > 0 for row in rows)
    rows = rows[:4]  # the step rows: FLOPs are counted for these
    assert 0 < rows[0]["mfu"] < 2  # FLOPs were counted for the MAE step
    # and for every other stage, each on its own step: the head stage runs the encoder forward on two views (plus the
    # head), stage 3 adds the upper half's backward and the target projector, feature extraction is one forward
    mae, head, ct, feats = (row["gflop_img"] for row in rows)
    assert all(row["mfu"] > 0 for row in rows)
    assert ct > head > 2 * feats > 0 and mae > 0
    # Feature extraction is one encoder forward: its matmuls by hand, attention's included (FlopCounterMode has no
    # formula for the CPU's attention kernel; bench.py counts there with the math backend): vit_nano, 32 px, patch 4.
    cfg = PRESETS["vit_nano"]
    D, T, L = cfg["embed_dim"], 65, 64  # width, tokens (CLS + 8 x 8 patches), patches
    block = 2 * T * D * 3 * D + 2 * 2 * T * T * D + 2 * T * D * D + 2 * 2 * T * D * 4 * D  # qkv, QK^T and AV, proj, MLP
    assert abs(feats - (cfg["depth"] * block + 2 * L * 3 * 4 * 4 * D) / 1e9) < 1.5e-3, feats  # + patch embedding
    assert "| mae (ours) |" in r.stdout
