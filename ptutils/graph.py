"""Draw a session's state graph with ``transitions``' own diagram support (Mermaid, no graphviz)."""

from __future__ import annotations

from collections.abc import Sequence

from transitions.extensions.diagrams import HierarchicalGraphMachine

from .stages import SEP, Stage, StageState, StageTransition, machine_states, machine_transitions


class _GraphMachine(HierarchicalGraphMachine):
    state_cls = StageState


class _Model:
    pass


def mermaid(stages: Sequence[Stage], transitions: Sequence[StageTransition], state: str = "pending") -> str:
    """Mermaid ``stateDiagram-v2`` text of a session's lifecycle and stage transitions, ``state`` marked."""
    model = _Model()
    machine = _GraphMachine(
        model=model,
        states=machine_states(stages),
        transitions=[
            {k: v for k, v in t.items() if k in ("trigger", "source", "dest")}
            for t in machine_transitions(stages, transitions)
        ],
        initial="pending",
        auto_transitions=False,
        graph_engine="mermaid",
        show_conditions=False,
    )
    machine.set_state(state, model)
    # Mermaid ids cannot hold the nested-state separator; the labels keep the stage names.
    return model.get_graph(force_new=True).draw(None).replace(f"running{SEP}", "running_")
