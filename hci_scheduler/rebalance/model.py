"""A CP-SAT sub-model of a rebalancing problem: a few hosts and their workloads, the rest fixed.

Built straight from the Problem's arrays and the current assignment (never by cloning a
model of the whole cluster, which stalls on ROADEF-sized instances). Variables x[w, h]
exist only for the pairs the static rules allow (open host, allowed class, dedicated
tenants); the objective is every term that the neighbourhood's workloads can change, in
the problem's integer units, so a lower value means a lower full objective.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from ortools.sat.python import cp_model

from .problem import Problem


@dataclass
class SubModel:
    """The model and the handles needed to read a solution back.

    model : CpModel
    workloads : int (k,)    the workloads that may move
    hosts : int (h,)        the hosts they may move between
    x : dict (w, h) -> BoolVar
    """

    model: cp_model.CpModel
    workloads: np.ndarray
    hosts: np.ndarray
    x: dict


def build(problem: Problem, current: np.ndarray, workloads: np.ndarray, hosts: np.ndarray,
          *, max_moves: int = -1, forbid_current: bool = False) -> SubModel:
    """The sub-model of moving `workloads` among `hosts`, everything else where it is.

    Parameters
    ----------
    problem : Problem
    current : int (n,)
        the assignment now; every workload in `workloads` is on one of `hosts`, or (a
        repair) on a host it must leave.
    workloads, hosts : int arrays
    max_moves : int
        cap on workloads away from their initial host in the whole assignment (-1: none).
    forbid_current : bool
        the workloads must leave their current host (a repair of a closed or full host).
    """
    p = problem
    W = np.asarray(workloads, dtype=np.int64)
    H = np.asarray(hosts, dtype=np.int64)
    cur = np.asarray(current, dtype=np.int64)
    in_w = np.zeros(p.n_workloads, bool)
    in_w[W] = True
    in_h = np.zeros(p.n_hosts, bool)
    in_h[H] = True
    rest = ~in_w
    T = p.transient
    model = cp_model.CpModel()

    # Data: what stays put. Load and transient holds of the fixed workloads on each host.
    fixed_rows = np.flatnonzero(rest & in_h[cur])
    use0 = p.fixed[H].copy()
    host_pos = {int(h): i for i, h in enumerate(H)}
    np.add.at(use0, [host_pos[int(h)] for h in cur[fixed_rows]], p.charge(fixed_rows, cur[fixed_rows]))
    held_rows = np.flatnonzero(rest & in_h[p.initial] & (cur != p.initial))
    cap0 = use0.copy()
    if held_rows.size and T.any():
        np.add.at(cap0, [host_pos[int(h)] for h in p.initial[held_rows]],
                  p.charge(held_rows, p.initial[held_rows]) * T[None, :])
    others_on = defaultdict(list)                  # host -> fixed workloads on it
    for v in fixed_rows:
        others_on[int(cur[v])].append(int(v))

    # Variables: x[w, h] for allowed pairs only.
    x = {}
    for w in W:
        w = int(w)
        t = p.tenant[w]
        for h in H:
            h = int(h)
            if not p.open[h] or not p.allowed[p.allowed_class[w], h]:
                continue
            if forbid_current and h == cur[w]:
                continue
            if not p.movable[w] and h != p.initial[w]:
                continue
            fixed_tenants = {int(p.tenant[v]) for v in others_on[h]}
            if t >= 0 and p.dedicated[t] and fixed_tenants - {int(t)}:
                continue  # a dedicated tenant shares a host with no one
            if any(ft >= 0 and p.dedicated[ft] and ft != t for ft in fixed_tenants):
                continue
            x[w, h] = model.new_bool_var(f"x{w}_{h}")
    by_w = defaultdict(list)
    by_h = defaultdict(list)
    for (w, h), var in x.items():
        by_w[w].append((h, var))
        by_h[h].append((w, var))

    # Each workload is on exactly one host.
    for w in W:
        model.add_exactly_one([v for _, v in by_w[int(w)]])

    # Capacity per host and dimension; a transient dimension counts a workload on its
    # initial host whether it stays or leaves (a constant there).
    objective = []
    for i, h in enumerate(H):
        h = int(h)
        ws = [w for w, _ in by_h[h]]
        charges = p.charge(np.array(ws, dtype=np.int64), np.full(len(ws), h)) if ws else np.zeros((0, p.n_dims), np.int64)
        stay_const = cap0[i].copy()
        for w in W:
            if p.initial[w] == h:
                stay_const += p.charge(np.array([w]), np.array([h]))[0] * T
        use_exprs = []
        for r in range(p.n_dims):
            terms = [(int(charges[j, r]), var) for j, (w, var) in enumerate(by_h[h])]
            cap_terms = [(c if not (T[r] and p.initial[w] == h) else 0, var)
                         for (c, var), (w, _) in zip(terms, by_h[h])]
            model.add(sum(c * v for c, v in cap_terms if c) + int(stay_const[r]) <= int(p.capacity[h, r]))
            use_exprs.append(sum(c * v for c, v in terms if c) + int(use0[i, r]))
        # Load cost: weight per unit above the target.
        for r in range(p.n_dims):
            if p.load_weight[r] > 0:
                hi = int(use0[i, r] + charges[:, r].sum() - p.target[h, r]) if ws else int(use0[i, r] - p.target[h, r])
                if hi > 0:
                    e = model.new_int_var(0, hi, f"load{h}_{r}")
                    model.add(e >= use_exprs[r] - int(p.target[h, r]))
                    objective.append(int(p.load_weight[r]) * e)
        # Balance cost: weight x max(0, target x avail_a - avail_b).
        for k, (da, db, tb, wb) in enumerate(p.balance):
            if wb <= 0:
                continue
            ub = int(tb) * int(p.capacity[h, da]) + int(charges[:, db].sum() + use0[i, db])
            e = model.new_int_var(0, max(ub, 0), f"bal{h}_{k}")
            model.add(e >= int(tb) * (int(p.capacity[h, da]) - use_exprs[da]) - (int(p.capacity[h, db]) - use_exprs[db]))
            objective.append(int(wb) * e)
        # A host costs while it runs a workload.
        if p.host_cost[h] > 0 and not others_on[h] and by_h[h]:
            y = model.new_bool_var(f"y{h}")
            for _, var in by_h[h]:
                model.add_implication(var, y)
            objective.append(int(p.host_cost[h]) * y)

    # Move costs: a workload is moved unless it is on its initial host.
    moved = {}
    for w in W:
        w = int(w)
        stay = x.get((w, int(p.initial[w])))
        moved[w] = (1 - stay) if stay is not None else 1
        cost = int(p.process_move_weight) * int(p.move_cost[w])
        s = p.service[w]
        if s >= 0:
            cost += int(p.group_move_weight[s])
        if cost:
            objective.append(cost * moved[w])
        if p.machine_move_weight:
            for h, var in by_w[w]:
                mm = (p.move_cost_matrix[p.initial[w], h] if p.move_cost_matrix is not None
                      else (p.location_move_cost if p.location[p.initial[w]] != p.location[h] else 0))
                if mm:
                    objective.append(int(p.machine_move_weight) * int(mm) * var)
    moved_rest = rest & (cur != p.initial)
    if max_moves >= 0:
        model.add(sum(moved[int(w)] for w in W) + int(moved_rest.sum()) <= max_moves)
    if p.service_move_weight and p.n_services:
        svc = p.service[moved_rest]
        const = np.bincount(svc[svc >= 0], minlength=p.n_services)
        top = model.new_int_var(int(const.max()), int(const.max()) + len(W), "service_moves")
        for s in np.unique(p.service[W]):
            if s >= 0:
                mine = [moved[int(w)] for w in W if p.service[w] == s]
                model.add(top >= int(const[s]) + sum(mine))
        objective.append(int(p.service_move_weight) * top)

    # Conflict: at most one workload of the service per host.
    for s in np.unique(p.service[W]):
        if s < 0 or not p.conflict[s]:
            continue
        for h in H:
            h = int(h)
            mine = [var for w, var in by_h[h] if p.service[w] == s]
            if mine:
                already = sum(1 for v in others_on[h] if p.service[v] == s)
                model.add(sum(mine) <= max(0, 1 - already))

    # Spread: the service covers at least spread_min locations.
    for s in np.unique(p.service[W]):
        if s < 0 or p.spread_min[s] < 2:
            continue
        members = np.flatnonzero((p.service == s) & rest)
        covered = set(p.location[cur[members]].tolist())
        by_loc = defaultdict(list)
        for w in W:
            if p.service[w] == s:
                for h, var in by_w[int(w)]:
                    if p.location[h] not in covered:
                        by_loc[int(p.location[h])].append(var)
        z = []
        for loc, vars_ in by_loc.items():
            zl = model.new_bool_var(f"z{s}_{loc}")
            model.add(zl <= sum(vars_))
            z.append(zl)
        model.add(len(covered) + sum(z) >= int(p.spread_min[s]))

    # Dependency (a, b): a neighbourhood holding a workload of a holds one of b. Only the
    # dependencies of the neighbourhood's services can change; the others hold as now.
    nbhs = np.unique(p.neighbourhood[H])
    services_w = np.unique(p.service[W])
    dep = p.depends[(p.depends[:, 0] != p.depends[:, 1])
                    & (np.isin(p.depends[:, 0], services_w) | np.isin(p.depends[:, 1], services_w))]
    if dep.size:
        # (service, neighbourhood) pairs held by the workloads that stay where they are.
        stay = rest & np.isin(p.service, dep)
        held = set(zip(p.service[stay].tolist(), p.neighbourhood[cur[stay]].tolist()))
        x_by = defaultdict(list)                   # (service, neighbourhood) -> vars
        for (w, h), var in x.items():
            x_by[int(p.service[w]), int(p.neighbourhood[h])].append(var)
        for a, b in dep.tolist():
            for nb in nbhs.tolist():
                if (b, nb) in held:
                    continue
                xb = x_by.get((b, nb), [])
                if (a, nb) in held:
                    model.add(sum(xb) >= 1)
                for var in x_by.get((a, nb), []):
                    model.add(var <= sum(xb))

    # Dedicated tenants: a host holding one shares it with no other workload.
    tenants = {int(t) for t in p.tenant[W] if t >= 0 and p.dedicated[t]}
    for t in tenants:
        for h in H:
            h = int(h)
            mine = [var for w, var in by_h[h] if p.tenant[w] == t]
            others = [var for w, var in by_h[h] if p.tenant[w] != t]
            if mine and others:
                d = model.new_bool_var(f"d{t}_{h}")
                for var in mine:
                    model.add_implication(var, d)
                for var in others:
                    model.add(var + d <= 1)

    # Objective: every term the neighbourhood can change.
    model.minimize(sum(objective))
    # Hint: the current placement.
    for (w, h), var in x.items():
        model.add_hint(var, int(cur[w] == h))
    return SubModel(model=model, workloads=W, hosts=H, x=x)

