"""The state graph as Mermaid text."""

from __future__ import annotations

from .support.sessionkit import session


def test_graph_is_mermaid_with_stages(url):
    s = session(url, stages=["train", "test"], transitions=[{"trigger": "evaluate", "source": "train", "dest": "test"}])
    text = s.graph()
    assert "stateDiagram-v2" in text
    assert "running_train --> running_test: evaluate" in text
    assert "pending --> running: start" in text
