"""Collection benchmark: the selector lookup against the Jinja filtering people write today.

    .venv/bin/python agent/benchmarks/collection.py [--hosts 10000] [--rounds 3] [--json]

One `ansible-playbook` run over a generated inventory of N hosts, each with
`bulkhead_labels` (what the bulkhead.microseg.endpoints inventory plugin sets). For each
question, in alternating order round by round, three tasks give the same answer:

1. lookup: `query('bulkhead.microseg.selector', "zone == 'trusted' && app == 'kafka'")`
   (the default `precedence=inventory`: labels read from the inventory);
2. lookup, full: the same with `precedence='full'` (every host through `hostvars`);
3. jinja: `groups['all'] | map('extract', hostvars) | selectattr(...) | ...`, the
   filtering a playbook writes without Bulkhead.

A callback plugin times each task (from task start to its result, the fork included; an
empty `set_fact` is measured the same way as the floor). Figures: the median per method
and question, and jinja / lookup (how many times faster the lookup is). The answers are
compared: a benchmark whose methods disagree fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# Each question: the selector, and the selectattr/rejectattr chain a playbook writes for it.
QUESTIONS: dict[str, tuple[str, str]] = {
    "zone-and-app": (
        "zone == 'trusted' && app == 'kafka'",
        "selectattr('bulkhead_labels.zone', 'defined')"
        " | selectattr('bulkhead_labels.zone', 'equalto', 'trusted')"
        " | selectattr('bulkhead_labels.app', 'defined')"
        " | selectattr('bulkhead_labels.app', 'equalto', 'kafka')"),
    "set-and-negation": (
        "app in {'db', 'cache'} && env != 'prod' && !has(quarantine)",
        "selectattr('bulkhead_labels.app', 'defined')"
        " | selectattr('bulkhead_labels.app', 'in', ['db', 'cache'])"
        " | rejectattr('bulkhead_labels.env', 'equalto', 'prod')"
        " | rejectattr('bulkhead_labels.quarantine', 'defined')"),
}
METHODS = ("lookup", "lookup_full", "jinja")

TIMER = '''\
"""Times each task of the benchmark's play: task start to its result, in the controller."""
import json
import os
import time

from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "bulkhead_bench_timer"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self):
        super().__init__()
        self.times, self.name, self.start = {}, None, 0.0

    def v2_playbook_on_task_start(self, task, is_conditional):
        self.name, self.start = task.get_name(), time.perf_counter()

    def v2_runner_on_ok(self, result):
        self.times[self.name] = time.perf_counter() - self.start

    def v2_playbook_on_stats(self, stats):
        with open(os.environ["BULKHEAD_BENCH_TIMES"], "w") as f:
            json.dump(self.times, f)
'''


def fleet(n: int) -> dict[str, Any]:
    """An inventory (ansible-inventory's JSON form) of N labeled hosts in 4 groups."""
    rng = random.Random(6)
    groups: dict[str, Any] = {f"dc{d}": {"hosts": {}} for d in range(4)}
    for i in range(n):
        labels = {"zone": rng.choice(["trusted", "dmz", "corp", "restricted"]),
                  "app": rng.choice(["web", "kafka", "db", "cache", "api", "ldap"]),
                  "env": rng.choice(["prod", "prod", "dev"])}
        if rng.random() < 0.1:
            labels["quarantine"] = "true"
        ip = f"198.18.{i // 250}.{i % 250 + 1}"
        groups[f"dc{i % 4}"]["hosts"][f"h{i:05d}"] = {
            "ansible_host": ip, "bulkhead_labels": labels, "bulkhead_expected_ips": [ip]}
    return {"all": {"children": groups}}


def expression(method: str, question: str) -> str:
    selector, chain = QUESTIONS[question]
    if method == "jinja":
        return ("groups['all'] | map('extract', hostvars) | " + chain
                + " | map(attribute='inventory_hostname') | list")
    full = ", precedence='full'" if method == "lookup_full" else ""
    return f"query('bulkhead.microseg.selector', {json.dumps(selector)}{full})"


def playbook(rounds: int) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = []
    for r in range(rounds):
        tasks.append({"name": f"floor r{r}", "ansible.builtin.set_fact": {"floor": 1}})
        # Rotate the order each round, so no method always runs first (or warm).
        order = METHODS[r % 3:] + METHODS[:r % 3]
        for question in QUESTIONS:
            for method in order:
                tasks.append({"name": f"{method} {question} r{r}",
                              "ansible.builtin.set_fact": {
                                  f"answer_{method}_{question}_{r}".replace("-", "_"):
                                  "{{ " + expression(method, question) + " }}"}})
    checks = []
    for question in QUESTIONS:
        q = question.replace("-", "_")
        for method in METHODS[1:]:
            checks.extend(f"answer_{method}_{q}_{r} == answer_lookup_{q}_0"
                          for r in range(rounds))
        checks.extend(f"answer_lookup_{q}_{r} == answer_lookup_{q}_0" for r in range(rounds))
        checks.append(f"answer_lookup_{q}_0 | length > 0")
    tasks.append({"name": "The methods agree", "ansible.builtin.assert": {"that": checks}})
    tasks.append({"name": "Write the answers", "ansible.builtin.copy": {
        "content": "{{ {" + ", ".join(
            f"'{q}': answer_lookup_{q.replace('-', '_')}_0" for q in QUESTIONS) + "} | to_json }}",
        "dest": "{{ answers_file }}", "mode": "0644"}})
    return [{"name": "Selector lookup against Jinja filtering", "hosts": "localhost",
             "gather_facts": False, "tasks": tasks}]


def run(n: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bulkhead-bench-collection-") as tmp:
        work = Path(tmp)
        subprocess.run([str(ROOT / "tests" / "collection-tree.sh"), str(work / "collections"),
                        "--link"], check=True)
        (work / "callbacks").mkdir()
        (work / "callbacks" / "bulkhead_bench_timer.py").write_text(TIMER)
        (work / "fleet.json").write_text(json.dumps(fleet(n)))
        (work / "play.yml").write_text(json.dumps(playbook(rounds), indent=1))
        env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(work / "collections"),
                   ANSIBLE_HOME=str(work / "home"), ANSIBLE_CALLBACK_PLUGINS=str(
                       work / "callbacks"), ANSIBLE_CALLBACKS_ENABLED="bulkhead_bench_timer",
                   ANSIBLE_LOCALHOST_WARNING="false", ANSIBLE_NOCOLOR="1",
                   ANSIBLE_PYTHON_INTERPRETER=sys.executable,
                   BULKHEAD_BENCH_TIMES=str(work / "times.json"),
                   PATH=f"{BIN}:{os.environ.get('PATH', '')}")
        proc = subprocess.run(
            [str(BIN / "ansible-playbook"), "-i", str(work / "fleet.json"), "-i", "localhost,",
             "-c", "local", str(work / "play.yml"), "-e", f"answers_file={work / 'answers.json'}"],
            env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"ansible-playbook failed:\n{proc.stdout[-5000:]}\n{proc.stderr}")
        times = json.loads((work / "times.json").read_text())
        answers = json.loads((work / "answers.json").read_text())
    result: dict[str, Any] = {
        "hosts": n, "rounds": rounds,
        "floor_ms": 1000 * statistics.median(times[f"floor r{r}"] for r in range(rounds)),
        "questions": {}}
    for question, (selector, _) in QUESTIONS.items():
        medians = {m: 1000 * statistics.median(times[f"{m} {question} r{r}"]
                                               for r in range(rounds)) for m in METHODS}
        result["questions"][question] = {
            "selector": selector, "matches": len(answers[question]),
            **{f"{m}_ms": round(v, 1) for m, v in medians.items()},
            "jinja_over_lookup": round(medians["jinja"] / medians["lookup"], 1),
            "full_over_lookup": round(medians["lookup_full"] / medians["lookup"], 1)}
    result["floor_ms"] = round(result["floor_ms"], 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hosts", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.hosts, args.rounds)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['hosts']} hosts, median of {result['rounds']} rounds per task "
          f"(an empty set_fact: {result['floor_ms']} ms)")
    print(f"{'question':<18} {'matches':>7} {'lookup ms':>10} {'lookup full ms':>15} "
          f"{'jinja ms':>10} {'jinja/lookup':>13} {'full/lookup':>12}")
    for question, q in result["questions"].items():
        print(f"{question:<18} {q['matches']:>7} {q['lookup_ms']:>10} {q['lookup_full_ms']:>15} "
              f"{q['jinja_ms']:>10} {q['jinja_over_lookup']:>12}x {q['full_over_lookup']:>11}x")


if __name__ == "__main__":
    main()
