// Child processes that speak JSON lines: the benchmark's servers and load
// generators print one JSON object per line on stdout and take commands on stdin.
import { spawn, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';

export interface JsonProc {
  proc: ChildProcess;
  /** Resolves with the first message for which `pred` is true. */
  next<T = Record<string, unknown>>(pred: (m: Record<string, unknown>) => boolean, timeoutMs?: number): Promise<T>;
  send(cmd: Record<string, unknown>): void;
  /** Ask and wait for the reply with the same `id`. */
  ask<T = Record<string, unknown>>(cmd: Record<string, unknown>, timeoutMs?: number): Promise<T>;
  onMessage(fn: (m: Record<string, unknown>) => void): void;
  exited: Promise<number | null>;
  stderr: string[];
  kill(signal?: NodeJS.Signals): Promise<number | null>;
}

let askId = 1;

export function spawnJson(script: string, args: string[], env: NodeJS.ProcessEnv = process.env, nodeArgs: string[] = []): JsonProc {
  const proc = spawn(process.execPath, [...nodeArgs, script, ...args], { env, stdio: ['pipe', 'pipe', 'pipe'] });
  const listeners = new Set<(m: Record<string, unknown>) => void>();
  const stderr: string[] = [];
  createInterface({ input: proc.stdout! }).on('line', (line) => {
    let m: Record<string, unknown>;
    try {
      m = JSON.parse(line);
    } catch {
      return;
    }
    for (const l of [...listeners]) l(m);
  });
  createInterface({ input: proc.stderr! }).on('line', (line) => {
    stderr.push(line);
    if (stderr.length > 200) stderr.shift();
  });
  const exited = new Promise<number | null>((r) => proc.once('exit', (code) => r(code)));
  const next = <T>(pred: (m: Record<string, unknown>) => boolean, timeoutMs = 600_000): Promise<T> =>
    new Promise<T>((res, rej) => {
      const timer = setTimeout(() => {
        listeners.delete(fn);
        rej(new Error(`${script}: timed out waiting for a message\n${stderr.slice(-20).join('\n')}`));
      }, timeoutMs);
      const fn = (m: Record<string, unknown>) => {
        if (m.error && m.fatal) {
          clearTimeout(timer);
          listeners.delete(fn);
          rej(new Error(`${script}: ${String(m.error)}`));
        } else if (pred(m)) {
          clearTimeout(timer);
          listeners.delete(fn);
          res(m as T);
        }
      };
      listeners.add(fn);
      void exited.then((code) => {
        if (!listeners.has(fn)) return;
        clearTimeout(timer);
        listeners.delete(fn);
        rej(new Error(`${script} exited with ${code}\n${stderr.slice(-20).join('\n')}`));
      });
    });
  const send = (cmd: Record<string, unknown>) => proc.stdin!.write(JSON.stringify(cmd) + '\n');
  return {
    proc,
    next,
    send,
    ask: <T>(cmd: Record<string, unknown>, timeoutMs?: number) => {
      const id = askId++;
      const p = next<T>((m) => m.id === id, timeoutMs);
      send({ ...cmd, id });
      return p;
    },
    onMessage: (fn) => void listeners.add(fn),
    exited,
    stderr,
    async kill(signal = 'SIGTERM') {
      if (proc.exitCode !== null || proc.signalCode !== null) return proc.exitCode;
      proc.kill(signal);
      return exited;
    },
  };
}

/** In a child: read JSON commands from stdin, answer on stdout. */
export function serveCommands(handler: (cmd: Record<string, unknown>) => Promise<Record<string, unknown>> | Record<string, unknown>): void {
  createInterface({ input: process.stdin }).on('line', (line) => {
    let cmd: Record<string, unknown>;
    try {
      cmd = JSON.parse(line);
    } catch {
      return;
    }
    Promise.resolve()
      .then(() => handler(cmd))
      .then(
        (r) => emit({ ...r, id: cmd.id }),
        (e: unknown) => emit({ id: cmd.id, error: (e as Error).message }),
      );
  });
}

export function emit(m: Record<string, unknown>): void {
  process.stdout.write(JSON.stringify(m) + '\n');
}
