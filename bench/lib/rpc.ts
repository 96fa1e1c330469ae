// A minimal JSON-RPC 2.0 client over one WebSocket (the `ws` package), for the
// load generator: no retries, no reconnects, errors surface with their stable
// `data.code` so the benchmark can count them.
import WebSocket from 'ws';

export class RpcError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

export class Rpc {
  private nextId = 1;
  private readonly pending = new Map<number, { res: (v: unknown) => void; rej: (e: unknown) => void }>();

  private constructor(private readonly ws: WebSocket) {
    ws.on('message', (data) => {
      let m: { id?: number; result?: unknown; error?: { message?: string; data?: { code?: string } } };
      try {
        m = JSON.parse(data.toString());
      } catch {
        return;
      }
      const p = m.id !== undefined ? this.pending.get(m.id) : undefined;
      if (!p) return;
      this.pending.delete(m.id!);
      if (m.error) p.rej(new RpcError(m.error.data?.code ?? 'RPC_ERROR', m.error.message ?? 'error'));
      else p.res(m.result);
    });
    ws.on('close', () => {
      for (const p of this.pending.values()) p.rej(new RpcError('CLOSED', 'connection closed'));
      this.pending.clear();
    });
    ws.on('error', () => undefined);
  }

  static connect(url: string, token?: string): Promise<Rpc> {
    return new Promise((res, rej) => {
      const ws = new WebSocket(url, { headers: token ? { authorization: `Bearer ${token}` } : {}, perMessageDeflate: false });
      ws.once('open', () => res(new Rpc(ws)));
      ws.once('error', rej);
      ws.once('unexpected-response', (_req, r) => rej(new Error(`upgrade refused: HTTP ${r.statusCode}`)));
    });
  }

  get inFlight(): number {
    return this.pending.size;
  }

  call(method: string, params: unknown): Promise<unknown> {
    const id = this.nextId++;
    return new Promise((res, rej) => {
      this.pending.set(id, { res, rej });
      this.ws.send(JSON.stringify({ jsonrpc: '2.0', id, method, params }));
    });
  }

  close(): void {
    this.ws.close();
  }
}

/** Round-robin over a few connections, each kept under the server's per-connection in-flight limit. */
export class RpcPool {
  private i = 0;
  constructor(readonly conns: Rpc[]) {}

  static async open(url: string, n: number, token?: string): Promise<RpcPool> {
    const conns: Rpc[] = [];
    for (let i = 0; i < n; i++) conns.push(await Rpc.connect(url, token));
    return new RpcPool(conns);
  }

  /** The least loaded connection. */
  pick(): Rpc {
    let best = this.conns[this.i++ % this.conns.length]!;
    for (const c of this.conns) if (c.inFlight < best.inFlight) best = c;
    return best;
  }

  close(): void {
    for (const c of this.conns) c.close();
  }
}
