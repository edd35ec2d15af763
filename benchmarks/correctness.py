"""Item 6: share of intact responses when 50 clients run a scenario at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from graceful_close.diagnostics.launch import ServerProcess
from graceful_close.diagnostics.scenarios import Target, early_response_upload, pipelined_after_close

from .plan import Plan
from .throughput import alternating

BIG = 2_000_000
UPLOAD_RESPONSE = 1_000_000
SCENARIO_TIMEOUT = 20.0  # a connection the server never ends shows as TIMEOUT


def _scenarios(plan: Plan) -> dict:
    return {
        "pipelined_after_close": lambda t: pipelined_after_close(
            t, close_path=f"/big?close=1&size={BIG}", timeout=SCENARIO_TIMEOUT),
        "early_response_upload": lambda t: early_response_upload(
            t, path=f"/upload?size={UPLOAD_RESPONSE}", upload_size=plan.upload_size,
            timeout=SCENARIO_TIMEOUT),
    }


def measure_correctness(servers: dict[str, ServerProcess], plan: Plan, log=print) -> dict:
    out: dict[str, dict] = {v: {} for v in servers}
    for i, (name, run) in enumerate(_scenarios(plan).items()):
        for variant in alternating(i):
            target = Target("127.0.0.1", servers[variant].port)
            with ThreadPoolExecutor(plan.correctness_clients) as pool:
                results = list(pool.map(run, [target] * plan.correctness_clients))
            intact = sum(r.intact for r in results)
            endings: dict[str, int] = {}
            for r in results:
                endings[r.ending] = endings.get(r.ending, 0) + 1
            out[variant][name] = {"intact": intact, "total": len(results), "endings": endings,
                                  "max_elapsed": max(r.elapsed for r in results)}
            log(f"    {name} x{len(results)} {variant}: {intact}/{len(results)} intact {endings}")
    return out
