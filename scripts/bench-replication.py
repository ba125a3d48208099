#!/usr/bin/env python3
"""Helper of scripts/bench-replication (not meant to be run alone).

Subcommands:
  wait-target STATE_DIR PID          print the target's bound address once its status file shows it
  drain REWIND RSTATE TSTATE TIMEOUT wait until the pair is fully drained (twice in a row)
  case  REWIND RSTATE TSTATE OUT.json NAME PIDS(export,replicator,target) -- FIO ARGS...
        run one workload: /proc CPU snapshots of the three daemons and the
        status counters before, fio, `rewind status --json` sampled every
        ~200 ms until drained, snapshots after; writes OUT.json
  report WORK                        print the markdown section body from WORK/*.json
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


def status(rewind, rstate, tstate):
    o = subprocess.run([rewind, "status", "--json", "--state-dir", rstate, "--target-state-dir", tstate],
                       capture_output=True, text=True, timeout=10)
    if o.returncode != 0:
        return None
    try:
        return json.loads(o.stdout)
    except ValueError:
        return None


def pair(doc):
    try:
        return doc["source"]["pairs"][0]
    except (KeyError, IndexError, TypeError):
        return None


def tvol(doc, name="vol0"):
    try:
        for v in doc["target"]["volumes"]:
            if v.get("name") == name:
                return v
    except (KeyError, TypeError):
        pass
    return None


def fully_drained(doc):
    """The same test as tests/src/replication.rs::fully_drained."""
    p = pair(doc)
    if p is None:
        return False
    s = p["status"]
    src_ok = (s.get("state") == "DifferentialSync" and s.get("connected") is True and s.get("drained") is True
              and s.get("rpo_ns") == 0 and s.get("pending_source_bytes") == 0 and s.get("in_flight_frames") == 0)
    v = tvol(doc, s.get("volume"))
    tgt_ok = v is not None and v["status"].get("spool_bytes") == 0 and \
        v["status"].get("applied_seq") == v["status"].get("durable_seq") and \
        v.get("journal", {}).get("pending_chunks") == 0
    return src_ok and tgt_ok


def wait_drained(rewind, rstate, tstate, timeout, on_doc=None, period=0.2):
    deadline = time.monotonic() + timeout
    hits = 0
    doc = None
    while True:
        doc = status(rewind, rstate, tstate)
        if on_doc and doc is not None:
            on_doc(doc)
        if doc is not None and fully_drained(doc):
            hits += 1
            if hits >= 2:
                return doc, True
        else:
            hits = 0
        if time.monotonic() > deadline:
            return doc, False
        time.sleep(period)


def cpu_ticks(pid):
    with open("/proc/%d/stat" % pid) as f:
        s = f.read()
    fields = s[s.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime = field 14, stime = field 15
    return int(fields[11]) + int(fields[12])


def counters(doc):
    p = pair(doc) or {}
    s = p.get("status", {})
    v = tvol(doc) or {}
    ts = v.get("status", {})
    return {
        "shipped_raw_bytes": s.get("shipped_raw_bytes", 0),
        "wire_bytes": s.get("wire_bytes", 0),
        "compression_ratio": s.get("compression_ratio"),
        "chunks_acked": s.get("chunks_acked", 0),
        "batches_committed": s.get("batches_committed", 0),
        "applied_bytes": ts.get("applied_bytes", 0),
        "capture_mode": s.get("capture_mode"),
        "state": s.get("state"),
        "bitmap_mode_entered": p.get("bitmap_mode_entered"),
        "resync_step1_entered": p.get("resync_step1_entered"),
        "reconnects": s.get("reconnects", 0),
    }


def cmd_wait_target(state_dir, pid):
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            v = json.load(open(os.path.join(state_dir, "status.json")))
            if v.get("pid") == int(pid) and v.get("listen"):
                print(v["listen"])
                return 0
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return 1


def cmd_drain(rewind, rstate, tstate, timeout):
    doc, ok = wait_drained(rewind, rstate, tstate, float(timeout))
    if not ok:
        sys.stderr.write(json.dumps(doc, indent=1)[:6000] + "\n")
        return 1
    return 0


def cmd_case(rewind, rstate, tstate, out, name, pids, fio_args):
    pids = dict(zip(("export", "replicator", "target"), (int(x) for x in pids.split(","))))
    doc0 = status(rewind, rstate, tstate)
    c0 = counters(doc0)
    cpu0 = {k: cpu_ticks(p) for k, p in pids.items()}
    samples = []  # (t since start, rpo_secs, capture_mode, state, phase)
    phase = ["load"]
    stop = threading.Event()
    t_start = time.monotonic()

    def record(doc):
        p = pair(doc)
        if p is None:
            return
        upd = p["status"].get("updated_ns") or 0
        age = (time.time_ns() - upd) / 1e9 if upd else None
        samples.append((time.monotonic() - t_start, p.get("rpo_secs"), p["status"].get("capture_mode"),
                        p["status"].get("state"), phase[0], age))

    def sampler():
        while not stop.is_set():
            t = time.monotonic()
            d = status(rewind, rstate, tstate)
            if d is not None:
                record(d)
            stop.wait(max(0.0, 0.2 - (time.monotonic() - t)))

    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    fio = subprocess.Popen(fio_args)

    def on_signal(sig, _frame):
        fio.terminate()
        try:
            fio.wait(5)
        except subprocess.TimeoutExpired:
            fio.kill()
        sys.exit(128 + sig)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    fio.wait()
    t_fio = time.monotonic() - t_start
    stop.set()
    th.join()
    phase[0] = "drain"
    doc1, ok = wait_drained(rewind, rstate, tstate, 300, on_doc=record)
    t_drained = time.monotonic() - t_start
    cpu1 = {k: cpu_ticks(p) for k, p in pids.items()}
    c1 = counters(doc1)
    res = {
        "name": name, "fio_rc": fio.returncode, "drained": ok,
        "t_fio": t_fio, "t_drained": t_drained,
        "cpu_secs": {k: (cpu1[k] - cpu0[k]) / CLK_TCK for k in pids},
        "before": c0, "after": c1, "samples": samples,
    }
    json.dump(res, open(out, "w"), indent=1)
    if fio.returncode != 0 or not ok:
        sys.stderr.write("case %s: fio rc %d, drained %s\n" % (name, fio.returncode, ok))
        return 1
    return 0


def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    f = int(k)
    c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)


def verdict(ok):
    return "**met**" if ok else "**MISSED**"


def cmd_report(work):
    meta = json.load(open(os.path.join(work, "meta.json")))
    mhz = meta["mhz"]
    hz = mhz * 1e6
    cases = []
    for wl, wlabel in (("rand4k", "4 KiB randwrite, %s" % meta["rand_rate_label"]),
                       ("seq1m", "1 MiB seq write, %s" % meta["seq_rate_label"]),
                       ("rand4klow", "4 KiB randwrite, %s" % meta.get("rand_low_label"))):
        for comp in ("off", "zstd:1"):
            tag = "%s.%s" % (wl, comp.replace(":", ""))
            if not os.path.exists(os.path.join(work, "case.%s.json" % tag)):
                continue
            r = json.load(open(os.path.join(work, "case.%s.json" % tag)))
            f = json.load(open(os.path.join(work, "fio.%s.json" % tag)))["jobs"][0]["write"]
            r["written"] = f["io_bytes"]
            r["fio_bw"] = f["bw_bytes"]
            r["wl"], r["wlabel"], r["comp"] = wl, wlabel, comp
            b, a = r["before"], r["after"]
            r["d_applied"] = a["applied_bytes"] - b["applied_bytes"]
            r["d_raw"] = a["shipped_raw_bytes"] - b["shipped_raw_bytes"]
            r["d_wire"] = a["wire_bytes"] - b["wire_bytes"]
            cases.append(r)
    lines = []
    lines.append("| workload | compression | written by fio | fio MB/s | applied at target | shipped MB/s (applied ÷ time to drain) | drain after fio | wire ratio raw/wire | "
                 "cycles/B export | cycles/B replicator | **cycles/B source** | **cycles/B target** | RPO p50 / p99 / max (s) | capture modes seen |")
    lines.append("|---" * 14 + "|")
    for r in cases:
        w = r["written"]
        cs = r["cpu_secs"]
        cyc = {k: cs[k] * hz / w if w else float("nan") for k in cs}
        r["cyc"] = cyc
        r["cyc_src"] = cyc["export"] + cyc["replicator"]
        rpos = [s[1] for s in r["samples"] if s[4] == "load" and s[1] is not None]
        r["rpo"] = (pct(rpos, 0.5), pct(rpos, 0.99), max(rpos) if rpos else float("nan"), len(rpos))
        modes = sorted(set(s[2] for s in r["samples"] if s[2]))
        r["ratio"] = r["d_raw"] / r["d_wire"] if r["d_wire"] else float("nan")
        lines.append("| %s | %s | %.0f MB | %.1f | %.0f MB | %.1f | %.1f s | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f / %.2f / %.2f (n=%d) | %s |" % (
            r["wlabel"], r["comp"], w / 1e6, r["fio_bw"] / 1e6, r["d_applied"] / 1e6,
            r["d_applied"] / 1e6 / r["t_drained"], r["t_drained"] - r["t_fio"], r["ratio"],
            cyc["export"], cyc["replicator"], r["cyc_src"], cyc["target"],
            r["rpo"][0], r["rpo"][1], r["rpo"][2], r["rpo"][3], ", ".join(modes)))
    lines.append("")
    lines.append("CPU seconds (utime+stime from /proc/PID/stat, from just before fio started to the end of the drain):")
    lines.append("")
    for r in cases:
        cs = r["cpu_secs"]
        lines.append("- %s, %s: export %.2f s, replicator %.2f s, target %.2f s over %.1f s; cycles per *applied* byte (instead of per written byte): source %.2f, target %.2f" % (
            r["wlabel"], r["comp"], cs["export"], cs["replicator"], cs["target"], r["t_drained"],
            (cs["export"] + cs["replicator"]) * hz / r["d_applied"] if r["d_applied"] else float("nan"),
            cs["target"] * hz / r["d_applied"] if r["d_applied"] else float("nan")))
    lines.append("")
    notrack = {}
    lines.append("Baseline, the same workloads against `rewind export --no-tracking` (no change log, nothing replicated), export CPU per byte written:")
    lines.append("")
    for wl in ("rand4k", "seq1m"):
        try:
            nt = json.load(open(os.path.join(work, "notrack.%s.json" % wl)))
            f = json.load(open(os.path.join(work, "fio.%s.notrack.json" % wl)))["jobs"][0]["write"]
        except (OSError, ValueError):
            continue
        c = nt["ticks"] / nt["clk_tck"] * hz / f["io_bytes"]
        notrack[wl] = c
        on = [r for r in cases if r["wl"] == wl]
        if not on:
            continue
        lines.append("- %s: %.2f cycles/B (%.0f MB written, %.1f MB/s); with tracking and replication the export used %s, so capture (the seed's *agent* work) costs ≈ %s cycles/B" % (
            on[0]["wlabel"], c, f["io_bytes"] / 1e6, f["bw_bytes"] / 1e6,
            " / ".join("%.2f (%s)" % (r["cyc"]["export"], r["comp"]) for r in on),
            " / ".join("%.2f" % (r["cyc"]["export"] - c) for r in on)) +
            (" (negative: inside the noise)" if any(r["cyc"]["export"] < c for r in on) else ""))
    lines.append("")
    peers = {}
    for wl in ("rand4k", "seq1m"):
        for peer in ("qemu-nbd", "nbdkit", "nbdkit-null"):
            try:
                pj = json.load(open(os.path.join(work, "peer.%s.%s.json" % (peer, wl))))
                f = json.load(open(os.path.join(work, "fio.%s.%s.json" % (wl, peer))))["jobs"][0]["write"]
            except (OSError, ValueError):
                continue
            peers.setdefault(wl, {})[peer] = (pj["ticks"] / pj["clk_tck"] * hz / f["io_bytes"], f["bw_bytes"] / 1e6, pj.get("version", peer))
    if peers:
        lines.append("Peers serving the same workloads alone (no capture, no replication), same file, server CPU per byte written:")
        lines.append("")
        for wl in ("rand4k", "seq1m"):
            on = [r for r in cases if r["wl"] == wl and r["comp"] == "off"]
            if wl not in peers or not on:
                continue
            r = on[0]
            servers = {k: v for k, v in peers[wl].items() if k != "nbdkit-null"}
            parts = ["`%s` %.2f (%.1f MB/s)" % (v[2], v[0], v[1]) for v in servers.values()]
            if wl in notrack:
                parts.insert(0, "`rewind export --no-tracking` %.2f" % notrack[wl])
            ratios = ", ".join("%.2f× %s's" % (r["cyc_src"] / v[0], k) for k, v in servers.items())
            line = "- %s: %s cycles/B; rewind's whole source uncompressed (serving + capture + replicator) %.2f = %s serving alone" % (
                r["wlabel"], ", ".join(parts), r["cyc_src"], ratios)
            null = peers[wl].get("nbdkit-null")
            if null:
                line += "; an NBD server that discards every write (`%s`, null plugin) spends %.2f cycles/B: the NBD round trip alone (socket, wake-ups), the floor for a user-space server here" % (null[2], null[0])
            lines.append(line)
        lines.append("")
    lines.append("Freshness of the replicator's status while sampling (now − `updated_ns` of the pair; the file is meant to be rewritten several times a second):")
    lines.append("")
    for r in cases:
        ld = [s[5] for s in r["samples"] if s[4] == "load" and len(s) > 5 and s[5] is not None]
        dr = [s[5] for s in r["samples"] if s[4] == "drain" and len(s) > 5 and s[5] is not None]
        lines.append("- %s, %s: max age %.2f s under load, %.2f s during the drain (%d + %d samples)" % (
            r["wlabel"], r["comp"], max(ld) if ld else float("nan"), max(dr) if dr else float("nan"), len(ld), len(dr)))
    # compression
    z = json.load(open(os.path.join(work, "zstd.json")))
    lines.append("")
    lines.append("Compression, ours (Δ shipped_raw_bytes ÷ Δ wire_bytes of the pair, frame headers included) against `zstd -1` (%s) on %d MiB of the data fio wrote (the start of the backing file after the runs, written by the 1 MiB job):" % (z["version"], z["sample_mib"]))
    lines.append("")
    lines.append("| | ratio | speed (MB/s of input, one core) |")
    lines.append("|---|---|---|")
    lines.append("| `zstd -1` on the whole sample (one stream) | %.3f | %.0f |" % (z["stream_ratio"], z["stream_mbps"]))
    lines.append("| `zstd -1` on 1 MiB pieces, each its own frame | %.3f | %.0f |" % (z["p1m_ratio"], z["p1m_mbps"]))
    lines.append("| `zstd -1` on 4 KiB pieces (%d MiB of the sample), each its own frame | %.3f | – |" % (z["p4k_mib"], z["p4k_ratio"]))
    rz = {r["wl"]: r for r in cases if r["comp"] == "zstd:1"}
    ro = {r["wl"]: r for r in cases if r["comp"] == "off"}
    for wl, label in (("rand4k", "4 KiB randwrite"), ("seq1m", "1 MiB seq write")):
        r = rz[wl]
        dcyc = r["cyc"]["replicator"] - ro[wl]["cyc"]["replicator"]
        if dcyc >= 1.0:
            sp = "≈ %.0f (implied by %.2f extra replicator cycles per written byte over compression off)" % (hz / dcyc / 1e6, dcyc)
        else:
            sp = "– (extra replicator CPU over compression off: %.2f cycles/B, inside the noise)" % dcyc
        lines.append("| rewind zstd:1, %s (wire, headers included) | %.3f | %s |" % (label, r["ratio"], sp))
    lines.append("")
    # targets
    lines.append("Targets (issue #3):")
    lines.append("")
    for wl in ("rand4k", "seq1m"):
        r = ro[wl]
        floor = peers.get(wl, {}).get("nbdkit-null")
        lines.append("- ≤ 4 cycles/byte on the source, uncompressed, %s: %.2f — %s%s" % (
            r["wlabel"], r["cyc_src"], verdict(r["cyc_src"] <= 4),
            " (an NBD server that discards the data costs %.2f here)" % floor[0] if floor else ""))
    for wl in ("rand4k", "seq1m"):
        r = ro[wl]
        c = notrack.get(wl)
        if c is not None:
            v = r["cyc"]["export"] - c + r["cyc"]["replicator"]
            lines.append("- ≤ 4 cycles/byte on the source, uncompressed, %s, counting only capture (export with tracking − export without) + replicator, i.e. not the NBD serving: %.2f — %s" % (r["wlabel"], v, verdict(v <= 4)))
    for r in cases:
        lines.append("- ≤ 13 cycles/byte on the target, %s, %s: %.2f — %s" % (r["wlabel"], r["comp"], r["cyc"]["target"], verdict(r["cyc"]["target"] <= 13)))
    for comp in ("off", "zstd:1"):
        r = [x for x in cases if x["wl"] == "rand4k" and x["comp"] == comp][0]
        lines.append("- RPO p99 ≤ 1 s at ~50 MB/s of 4 KiB random writes, %s: %.2f s — %s" % (comp, r["rpo"][1], verdict(r["rpo"][1] <= 1.0)))
    for r in cases:
        if r["wl"] == "rand4klow":
            lines.append("- (for information) RPO p99 at %.0f MB/s of 4 KiB random writes, %s: %.2f s (≤ 1 s: %s)" % (r["fio_bw"] / 1e6, r["comp"], r["rpo"][1], "yes" if r["rpo"][1] <= 1.0 else "no"))
    # fair comparison: granularity-matched
    for wl, zr, what in (("rand4k", z["p4k_ratio"], "4 KiB pieces"), ("seq1m", z["p1m_ratio"], "1 MiB pieces")):
        r = rz[wl]
        rel = r["ratio"] / zr
        lines.append("- compression ratio within 5%% of `zstd -1` (%s vs zstd on %s): %.3f vs %.3f (%.1f%%) — %s" % (
            r["wlabel"], what, r["ratio"], zr, (rel - 1) * 100, verdict(rel >= 0.95)))
    lines.append("")
    lines.append("Seed product (REFERENCE.md, Appendix A of the Cisco guide, at ≤ 7 MB/s): agent ≈ 40 cycles/byte, process server ≈ 29 (uncompressed) / 128 (compressed), master target ≈ 83. "
                 "Here: export + replicator = source (the agent and the process server's work both happen on the source), target = master target.")
    print("\n".join(lines))
    summary_path = os.environ.get("BENCH_SUMMARY_JSON")
    if summary_path:
        # The headline figures of this run, for scripts/bench-replication-rounds.
        summary = {"cases": {}, "wl": {}}
        for r in cases:
            summary["cases"]["%s, %s" % (r["wlabel"], r["comp"])] = {
                "target": r["cyc"]["target"], "source": r["cyc_src"],
                "export": r["cyc"]["export"], "replicator": r["cyc"]["replicator"],
                "rpo_p99": r["rpo"][1], "wire_ratio": r["ratio"]}
        for wl in ("rand4k", "seq1m"):
            if wl not in ro:
                continue
            w = {"label": ro[wl]["wlabel"], "source_off": ro[wl]["cyc_src"]}
            if wl in notrack:
                w["export_no_tracking"] = notrack[wl]
                w["capture_plus_replicator"] = ro[wl]["cyc"]["export"] - notrack[wl] + ro[wl]["cyc"]["replicator"]
            for k, v in peers.get(wl, {}).items():
                w["peer " + k] = v[0]
            summary["wl"][wl] = w
        json.dump(summary, open(summary_path, "w"), indent=1)
    return 0


def main():
    a = sys.argv[1:]
    if a[0] == "wait-target":
        return cmd_wait_target(a[1], a[2])
    if a[0] == "drain":
        return cmd_drain(*a[1:5])
    if a[0] == "case":
        i = a.index("--")
        return cmd_case(*a[1:7], a[i + 1:])
    if a[0] == "report":
        return cmd_report(a[1])
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
