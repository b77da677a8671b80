"""Reports modules of a Rust crate that import each other in a circle (through `crate::`,
`super::` and `self::` paths outside tests). Usage: module_cycles.py <crate src dir>...
Exits 1 if any crate has a cycle."""

import os
import re
import sys


def module_name(root, path):
    parts = os.path.relpath(path, root)[:-3].split(os.sep)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return "::".join(parts) or "crate"


def imports(root):
    graph = {}
    for directory, _, files in os.walk(root):
        for file in files:
            if not file.endswith(".rs"):
                continue
            path = os.path.join(directory, file)
            name = module_name(root, path)
            parts = [] if name == "crate" else name.split("::")
            text = open(path, encoding="utf-8").read().split("#[cfg(test)]")[0]
            targets = set()
            for match in re.finditer(r"crate::([a-z_0-9]+)(?:::([a-z_0-9]+))?", text):
                targets.add("::".join(p for p in match.groups() if p))
            for match in re.finditer(r"crate::\{([^}]*)\}", text):
                targets.update(t.strip().split("::")[0] for t in match.group(1).split(",") if t.strip())
            for match in re.finditer(r"super::([a-z_0-9]+)", text):
                targets.add("::".join(parts[:-1] + [match.group(1)]))
            for match in re.finditer(r"self::([a-z_0-9]+)", text):
                targets.add("::".join(parts + [match.group(1)]))
            graph[name] = targets
    resolved = {}
    for name, targets in graph.items():
        resolved[name] = set()
        for target in targets:
            pieces = target.split("::")
            for length in range(len(pieces), 0, -1):
                candidate = "::".join(pieces[:length])
                if candidate in graph and candidate != name:
                    resolved[name].add(candidate)
                    break
    return resolved


def cycles(graph):
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def main():
    broken = False
    for root in sys.argv[1:]:
        for component in cycles(imports(root)):
            print(f"module cycle in {root}: {' <-> '.join(component)}")
            broken = True
    sys.exit(1 if broken else 0)


if __name__ == "__main__":
    main()
