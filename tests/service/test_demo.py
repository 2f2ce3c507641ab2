"""`strop demo` against a real service: it sends logged traffic, reports progress and the
versions promoted meanwhile, and measures held-out accuracy with requests that never
enter the prompt log.

The learner's part (a promotion while the demo runs) is played by the test, through the
same registry calls the learner makes.
"""

import threading
import time

from ops.demo import HELD_OUT_SEED, run_demo
from ops.questions import make_labeled_set
from strop.records import AdapterVersion, Keys, PromptLogRecord
from strop.registry import Registry
from tests.service.harness import ServerThread


def test_demo_reports_new_promotion_and_held_out_accuracy_without_logging_it(
    settings, tiny_engine, redis_client, adapter_root, capsys
):
    keys = Keys(settings.redis_prefix)
    registry = Registry(redis_client, keys)
    registry.add(AdapterVersion(version="v1", parent="base", path=str(adapter_root / "v1")))
    registry.promote("v1")  # before the demo: not counted as the demo's

    def learner_stand_in(stop: threading.Event) -> None:
        while not stop.is_set() and redis_client.xlen(keys.prompt_log) < 2:
            time.sleep(0.1)
        registry.add(AdapterVersion(version="v2", parent="v1", path=str(adapter_root / "v2")))
        registry.promote("v2")

    stop = threading.Event()
    promoter = threading.Thread(target=learner_stand_in, args=(stop,), daemon=True)
    with ServerThread(settings, tiny_engine) as server:
        promoter.start()
        demo_settings = settings.model_copy(update={"service_url": server.url})
        try:
            code = run_demo(demo_settings, versions=1, minutes=2, held_out=6)
        finally:
            stop.set()
            promoter.join(10)
    out = capsys.readouterr().out

    assert code == 0, out
    progress = [line for line in out.splitlines() if "prompts sent" in line]
    assert progress and progress[-1].endswith("(1 promoted now, strop -> v2)")
    assert "1 version(s) promoted during the demo (target reached)" in out
    table = [
        [c.strip() for c in line.split("|")[1:-1]]
        for line in out.splitlines()
        if line.startswith("| ")
    ]
    versions = {row[0]: row for row in table if len(row) == 6}
    assert versions["v2"][1:3] == ["promoted", "v1"]  # status, parent
    accuracy = {row[0]: float(row[1]) for row in table if len(row) == 2 and row[0] != "model"}
    assert set(accuracy) == {"base", "strop@v2"}
    assert all(0.0 <= a <= 1.0 for a in accuracy.values())

    # the traffic was logged; the held-out questions never were
    logged = [PromptLogRecord.from_stream(f) for _, f in redis_client.xrange(keys.prompt_log)]
    assert logged, "the demo's traffic was not logged"
    logged_prompts = {m["content"] for rec in logged for m in rec.messages}
    held_out = {q.prompt for q in make_labeled_set(6, seed=HELD_OUT_SEED)}
    assert logged_prompts.isdisjoint(held_out)
