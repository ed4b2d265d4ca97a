"""Before/after medians over rounds, raw and normalised to torch.nn's step in the same run."""
import glob, json, statistics, sys
from collections import defaultdict

names = {"gru_pixel": "GRU pixel T=1024", "gru_long": "GRU long T=4096",
         "gru_char": "GRU char T=256", "lstm_char": "LSTM char T=256"}
steps = defaultdict(list)  # (setting, tree, method) -> [ms per round]
norm = defaultdict(list)
rounds = set()
for f in sorted(glob.glob("/work/runs/ba/*_r*.json")):
    base = f.rsplit("/", 1)[1][:-5]
    setting, tree, r = base.rsplit("_", 2)
    rounds.add(r)
    d = json.load(open(f))
    recs = {x["method"]: x["total_ms"] for x in d["records"]}
    for m, ms in recs.items():
        steps[(setting, tree, m)].append(ms)
        norm[(setting, tree, m)].append(ms / recs["torch"])
print(f"rounds: {len(rounds)}")
print("| setting | method | before ms | after ms | after / before | before / torch.nn | after / torch.nn | normalised after / before |")
print("|---|---|---|---|---|---|---|---|")
for s in names:
    for m in ["torch", "hbp-exact", "highway(k=0)", "highway(k=1)", "highway(k=3)"]:
        b, a = steps.get((s, "before", m)), steps.get((s, "after", m))
        if not b or not a:
            continue
        mb, ma = statistics.median(b), statistics.median(a)
        nb, na = statistics.median(norm[(s, "before", m)]), statistics.median(norm[(s, "after", m)])
        print(f"| {names[s]} | {m} | {mb:.1f} | {ma:.1f} | {ma / mb:.3f} | {nb:.3f} | {na:.3f} | {na / nb:.3f} |")
print("\nper-round spread (min-max ms):")
for (s, t, m), v in sorted(steps.items()):
    if m != "torch" and len(v) > 1:
        print(f"  {s} {t} {m}: {min(v):.0f}-{max(v):.0f}")
