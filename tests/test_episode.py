"""The episode engine's routing and approval decisions (acf.coordinator.episode), which the coordinator graph and the
distributed workers share; the full episodes run in test_pipeline.py and test_distributed.py."""

from types import SimpleNamespace

from acf.coordinator import episode as E


def test_route_goes_through_every_stage_when_ok_and_to_record_otherwise():
    stage, seen = "preflight", []
    while stage != "record":
        seen.append(stage)
        stage = E.route(stage, {"status": "ok"})
    assert seen == list(E.STAGES) == ["preflight", "compress", "proxy", "evaluate"]
    for stage in E.STAGES:
        for status in ("rejected", "failed", "pruned"):
            assert E.route(stage, {"status": status}) == "record"


def test_the_graph_routes_with_the_engines_route():
    from acf.coordinator.graph import build_graph

    g = build_graph(SimpleNamespace()).get_graph()
    edges = {(e.source, e.target) for e in g.edges}
    assert ("proxy", "evaluate") in edges and ("proxy", "update") in edges     # the proxy decision is an edge
    assert {("preflight", "compress"), ("compress", "proxy"), ("evaluate", "update")} <= edges


def test_approval_answers():
    ctx = SimpleNamespace(spec=None, cfg=SimpleNamespace(device="cpu"))
    assert E.decide(ctx, "approve") == ("approve", None, None)
    assert E.decide(ctx, " Skip ") == ("skip", None, None)
    action, strat, note = E.decide(ctx, '{"action": "edit", "strategy": [{"method": "rtn"}]}')
    assert action == "edit" and strat.steps[0].params["bits"] == 4 and note is None
    action, strat, note = E.decide(ctx, {"action": "edit", "strategy": [{"method": "rtn", "params": {"bits": 5}}]})
    assert action == "reask" and strat is None and "bits" in note
    assert E.decide(ctx, "maybe")[0] == "reask" and "unknown choice" in E.decide(ctx, "maybe")[2]
    assert E.decide(ctx, "{not json")[0] == "reask"
