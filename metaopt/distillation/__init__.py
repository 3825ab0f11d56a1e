"""Decentralized learning with multi-headed distillation (Zhmoginov et al., CVPR 2023): agents as a batch dimension,
communication graphs, confidence-based distillation targets, auxiliary heads, and the ``distillation`` pipeline."""

from metaopt.distillation.agents import AgentData, AgentModels, BatchedLinear, agent_data
from metaopt.distillation.graphs import GRAPHS, communication_graph, hops
from metaopt.distillation.method import (
    DistillationSettings,
    agent_losses,
    distillation_targets,
    evaluate,
    exchange,
    public_predictions,
    source_heads,
    train_agents,
)

__all__ = ["AgentData", "AgentModels", "BatchedLinear", "agent_data", "GRAPHS", "communication_graph", "hops",
           "DistillationSettings", "agent_losses", "distillation_targets", "evaluate", "exchange",
           "public_predictions", "source_heads", "train_agents"]
