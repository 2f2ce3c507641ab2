"""The worker's Prometheus metrics (its time series are tested in tests/strop/test_series.py)."""

from strop.series import Obs
from worker.monitor import WorkerMetrics


def test_worker_metrics_observe_counts_and_values():
    m = WorkerMetrics()
    m.observe(
        [
            Obs("built", "v2", label="ttrl"),
            Obs("dropped", "v2", label="weak_majority"),
            Obs("reward", "v2", 3.0, 4),
            Obs("judge_score", "v2", 4.5, label="5"),
        ]
    )
    get = m.registry.get_sample_value
    assert get("strop_worker_groups_built_total", {"version": "v2", "method": "ttrl"}) == 1
    assert get("strop_worker_dropped_total", {"version": "v2", "reason": "weak_majority"}) == 1
    assert get("strop_worker_reward_sum", {"version": "v2"}) == 0.75  # one group, mean 3/4
    assert get("strop_worker_judge_score_bucket", {"version": "v2", "le": "4.0"}) == 0
    assert get("strop_worker_judge_score_bucket", {"version": "v2", "le": "4.5"}) == 1
