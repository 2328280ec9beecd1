//! The stage graph: a petgraph DAG from input references, its cycles and a stable
//! topological order.
use std::collections::{BTreeSet, HashMap};

use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};

use super::resolved::ResolvedStage;

/// The graph of stages: an edge from each input to the stage that reads it.
pub fn graph(stages: &[ResolvedStage]) -> (DiGraph<usize, ()>, Vec<NodeIndex>) {
    let mut g = DiGraph::new();
    let nodes: Vec<NodeIndex> = (0..stages.len()).map(|i| g.add_node(i)).collect();
    let index: HashMap<&str, usize> = stages.iter().enumerate().map(|(i, s)| (s.id.as_str(), i)).collect();
    for (i, stage) in stages.iter().enumerate() {
        for upstream in stage.inputs.values().flatten() {
            if let Some(&u) = index.get(upstream.as_str()) {
                g.update_edge(nodes[u], nodes[i], ());
            }
        }
    }
    (g, nodes)
}

/// Stages in dependency order; among stages that are ready at the same time, the order of the
/// file is kept. On a cycle, the ids of one cycle in order.
pub fn topological(stages: &[ResolvedStage]) -> Result<Vec<ResolvedStage>, Vec<String>> {
    let (g, nodes) = graph(stages);
    if let Some(cycle) = find_cycle(&g, stages) {
        return Err(cycle);
    }
    let mut indegree: Vec<usize> = nodes.iter().map(|&n| g.neighbors_directed(n, petgraph::Incoming).count()).collect();
    let mut ready: BTreeSet<usize> = (0..stages.len()).filter(|&i| indegree[i] == 0).collect();
    let mut order = Vec::with_capacity(stages.len());
    while let Some(i) = ready.pop_first() {
        order.push(stages[i].clone());
        for n in g.neighbors_directed(nodes[i], petgraph::Outgoing) {
            let j = g[n];
            indegree[j] -= 1;
            if indegree[j] == 0 {
                ready.insert(j);
            }
        }
    }
    Ok(order)
}

fn find_cycle(g: &DiGraph<usize, ()>, stages: &[ResolvedStage]) -> Option<Vec<String>> {
    for component in tarjan_scc(g) {
        if component.len() > 1 {
            // Walk the component along its edges to print the cycle in order.
            let members: BTreeSet<NodeIndex> = component.iter().copied().collect();
            let start = *members.iter().min_by_key(|n| g[**n])?;
            let mut path = vec![start];
            let mut current = start;
            loop {
                let next = g.neighbors_directed(current, petgraph::Outgoing).filter(|n| members.contains(n)).min_by_key(|n| g[*n])?;
                if path.contains(&next) {
                    let from = path.iter().position(|n| *n == next).unwrap_or(0);
                    return Some(path[from..].iter().map(|n| stages[g[*n]].id.clone()).collect());
                }
                path.push(next);
                current = next;
            }
        }
    }
    None
}
