"""Node order in graphs with control flow.

An ``If``, ``Loop`` or ``Scan`` body may read tensors of the enclosing graph by name (outer
scope) without listing them as the node's inputs. onnx.checker requires their producers to come
first; onnxruntime's quantizer and the fp16 converter sort by the listed inputs only, so they
can write the ``If`` before the node its branch reads (``Nodes in a graph must be topologically
sorted, however input 'z' of node ...``). :func:`order_nodes` sorts with those reads counted.
"""

from __future__ import annotations

import heapq
from pathlib import Path


def _subgraphs(node):
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def outer_reads(graph) -> set[str]:
    """Names ``graph`` (a subgraph) reads that it does not define itself."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    reads: set[str] = set()
    for node in graph.node:
        reads.update(x for x in node.input if x)
        for g in _subgraphs(node):
            reads |= outer_reads(g)
        defined.update(node.output)
    reads.update(o.name for o in graph.output)
    return reads - defined


def all_nodes(graph):
    """Every node of ``graph`` and of its subgraphs, outer ones first."""
    for node in graph.node:
        yield node
        for g in _subgraphs(node):
            yield from all_nodes(g)


def constant_weights_to_initializers(graph, op_types: tuple[str, ...]) -> int:
    """Turn the ``Constant`` nodes that feed a weight input (input 1) of ``op_types`` nodes into
    initializers; returns how many moved. onnxruntime's quantizer finds weights among the
    initializers only, so a graph exported with its weights as Constant nodes (PaddleOCR's
    models) would keep every such weight in fp32. The values are copied exactly."""
    import onnx

    weights = {n.input[1] for n in graph.node if n.op_type in op_types and len(n.input) > 1}
    outputs = {o.name for o in graph.output}
    keep, moved = [], 0
    for n in graph.node:
        value = n.attribute[0] if n.op_type == "Constant" and len(n.attribute) == 1 else None
        if value is not None and value.name == "value" and n.output[0] in weights - outputs:
            t = onnx.TensorProto()
            t.CopyFrom(value.t)
            t.name = n.output[0]
            graph.initializer.append(t)
            moved += 1
        else:
            keep.append(n)
    if moved:
        del graph.node[:]
        graph.node.extend(keep)
    return moved


def has_control_flow(graph) -> bool:
    return any(True for n in graph.node for _ in _subgraphs(n))


def order_nodes(graph) -> bool:
    """Stable topological sort of ``graph.node`` (and of every subgraph), counting outer-scope
    reads of subgraphs as inputs; returns whether anything moved. A cycle is left as it is."""
    changed = False
    nodes = list(graph.node)
    for n in nodes:
        for g in _subgraphs(n):
            changed |= order_nodes(g)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    deps = []
    for i, n in enumerate(nodes):
        names = set(n.input)
        for g in _subgraphs(n):
            names |= outer_reads(g)
        deps.append({producer[x] for x in names if x in producer and producer[x] != i})
    users: dict[int, list[int]] = {}
    for i, d in enumerate(deps):
        for j in d:
            users.setdefault(j, []).append(i)
    left = [len(d) for d in deps]
    ready = [i for i, k in enumerate(left) if k == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, []):
            left[u] -= 1
            if left[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes) or order == list(range(len(nodes))):
        return changed
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)
    return True


def reorder_file(folder: Path, model_file: str) -> bool:
    """Re-save ``folder/model_file`` with :func:`order_nodes` applied when the graph has
    control flow and was out of order; returns whether it was rewritten."""
    import onnx

    from deployopt.stages.base import model_files, save_model

    path = folder / model_file
    model = onnx.load(str(path), load_external_data=False)
    if not has_control_flow(model.graph):
        return False
    model = onnx.load(str(path))
    if not order_nodes(model.graph):
        return False
    for f in model_files(path):
        f.unlink()
    save_model(model, folder)
    return True
