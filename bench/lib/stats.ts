// Small statistics helpers for the benchmark: percentiles, medians, a
// least-squares slope, and fixed-width table printing.

export function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return NaN;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[i]!;
}

export interface Latency {
  n: number;
  p50: number;
  p99: number;
  p999: number;
  max: number;
  mean: number;
}

export function latency(samples: number[]): Latency {
  const s = Float64Array.from(samples).sort();
  const arr = Array.from(s);
  const mean = arr.reduce((a, b) => a + b, 0) / Math.max(1, arr.length);
  return {
    n: arr.length,
    p50: round(percentile(arr, 50)),
    p99: round(percentile(arr, 99)),
    p999: round(percentile(arr, 99.9)),
    max: round(arr[arr.length - 1] ?? NaN),
    mean: round(mean),
  };
}

export function median(xs: number[]): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/** Least-squares slope of y over x. */
export function slope(points: { x: number; y: number }[]): number {
  const n = points.length;
  if (n < 2) return NaN;
  const mx = points.reduce((a, p) => a + p.x, 0) / n;
  const my = points.reduce((a, p) => a + p.y, 0) / n;
  let num = 0;
  let den = 0;
  for (const p of points) {
    num += (p.x - mx) * (p.y - my);
    den += (p.x - mx) ** 2;
  }
  return den === 0 ? NaN : num / den;
}

/**
 * What share of the HSM ceiling this machine leaves room for, when the HSM is software
 * on the same cores (SoftHSM) and the load generator runs here too (the issue asks for
 * one run on one machine). Each recovery needs the ceiling's own HSM work and the load
 * generator's work; even a daemon that added no CPU of its own could not go faster
 * than the cores fit those two. `selfUs` adds the daemon's own CPU beyond the HSM calls.
 */
export function coreBound(o: { cores: number; ceilingPerSec: number; hsmCpuUs: number; loadgenCpuUs: number; selfUs?: number }): { perSec: number; overCeiling: number } {
  const perSec = Math.min(o.ceilingPerSec, (o.cores * 1e6) / (o.hsmCpuUs + o.loadgenCpuUs + (o.selfUs ?? 0)));
  return { perSec: round(perSec, 1), overCeiling: round(perSec / o.ceilingPerSec, 3) };
}

export const round = (x: number, d = 2): number => (Number.isFinite(x) ? Math.round(x * 10 ** d) / 10 ** d : x);

export function table(headers: string[], rows: (string | number)[][]): string {
  const cells = [headers, ...rows.map((r) => r.map((c) => (typeof c === 'number' ? String(round(c)) : c)))];
  const widths = headers.map((_, i) => Math.max(...cells.map((r) => String(r[i] ?? '').length)));
  const line = (r: (string | number)[]) => '| ' + r.map((c, i) => String(c ?? '').padEnd(widths[i]!)).join(' | ') + ' |';
  return [line(cells[0]!), '|' + widths.map((w) => '-'.repeat(w + 2)).join('|') + '|', ...cells.slice(1).map(line)].join('\n');
}
