"""The episode engine's routing and approval decisions (acf.coordinator.episode), which the coordinator graph and the
distributed workers share; the full episodes run in test_pipeline.py and test_distributed.py."""

from types import SimpleNamespace

from acf.coordinator import episode


def test_route_goes_through_every_stage_when_ok_and_to_record_otherwise():
    stage, seen = "preflight", []
    while stage != "record":
        seen.append(stage)
        stage = episode.route(stage, {"status": "ok"})
    assert seen == list(episode.STAGES) == ["preflight", "compress", "proxy", "evaluate"]
    for stage in episode.STAGES:
        for status in ("rejected", "failed", "pruned"):
            assert episode.route(stage, {"status": status}) == "record"


def test_the_graph_routes_with_the_engines_route():
    from acf.coordinator.graph import build_graph

    g = build_graph(SimpleNamespace()).get_graph()
    edges = {(e.source, e.target) for e in g.edges}
    assert ("proxy", "evaluate") in edges and ("proxy", "update") in edges     # the proxy decision is an edge
    assert {("preflight", "compress"), ("compress", "proxy"), ("evaluate", "update")} <= edges


def test_approval_answers():
    ctx = SimpleNamespace(spec=None, cfg=SimpleNamespace(device="cpu"))
    assert episode.decide(ctx, "approve") == ("approve", None, None)
    assert episode.decide(ctx, " Skip ") == ("skip", None, None)
    action, strat, note = episode.decide(ctx, '{"action": "edit", "strategy": [{"method": "rtn"}]}')
    assert action == "edit" and strat.steps[0].params["bits"] == 4 and note is None
    action, strat, note = episode.decide(ctx, {"action": "edit", "strategy": [{"method": "rtn", "params": {"bits": 5}}]})
    assert action == "reask" and strat is None and "bits" in note
    assert episode.decide(ctx, "maybe")[0] == "reask" and "unknown choice" in episode.decide(ctx, "maybe")[2]
    assert episode.decide(ctx, "{not json")[0] == "reask"
