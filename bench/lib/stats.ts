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
 * The most recoveries/s (and share of the HSM ceiling) that `cores` allow when every
 * recovery needs `cpuUs` of CPU on them. With SoftHSM the HSM calls run on the same
 * cores as the daemon, and the issue asks for the load generator on the same machine
 * too: their CPU per recovery has to fit whatever the daemon does (docs/PERFORMANCE.md).
 */
export function coreBound(o: { cores: number; ceilingPerSec: number; cpuUs: number }): { perSec: number; overCeiling: number } {
  const perSec = Math.min(o.ceilingPerSec, (o.cores * 1e6) / o.cpuUs);
  return { perSec: round(perSec, 1), overCeiling: round(perSec / o.ceilingPerSec, 3) };
}

export const round = (x: number, d = 2): number => (Number.isFinite(x) ? Math.round(x * 10 ** d) / 10 ** d : x);

export function table(headers: string[], rows: (string | number)[][]): string {
  const cells = [headers, ...rows.map((r) => r.map((c) => (typeof c === 'number' ? String(round(c)) : c)))];
  const widths = headers.map((_, i) => Math.max(...cells.map((r) => String(r[i] ?? '').length)));
  const line = (r: (string | number)[]) => '| ' + r.map((c, i) => String(c ?? '').padEnd(widths[i]!)).join(' | ') + ' |';
  return [line(cells[0]!), '|' + widths.map((w) => '-'.repeat(w + 2)).join('|') + '|', ...cells.slice(1).map(line)].join('\n');
}
