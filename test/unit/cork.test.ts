// corkPerTurn on a real TCP socket pair: writes made in one event-loop turn
// are held and leave together after it; nothing is held past the turn.
import { describe, it, expect, afterEach } from 'vitest';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { corkPerTurn } from '../../vault/rpc/cork.js';

let server: Server | undefined;
let sockets: Socket[] = [];
afterEach(() => {
  for (const s of sockets) s.destroy();
  sockets = [];
  server?.close();
});

async function pair(): Promise<{ sender: Socket; received: () => string }> {
  let got = '';
  server = createServer((s) => {
    sockets.push(s);
    s.on('data', (d) => (got += d.toString()));
  });
  await new Promise<void>((r) => server!.listen(0, '127.0.0.1', r));
  const port = (server.address() as { port: number }).port;
  const sender = connect(port, '127.0.0.1');
  sockets.push(sender);
  await new Promise((r) => sender.once('connect', r));
  return { sender, received: () => got };
}

describe('corkPerTurn', () => {
  it('holds the writes of one turn and sends them all after it', async () => {
    const { sender, received } = await pair();
    const hold = corkPerTurn(sender);
    for (let i = 0; i < 10; i++) {
      hold();
      sender.write(`m${i};`);
    }
    // Still this turn: corked once (not ten times), everything buffered, nothing sent.
    expect(sender.writableCorked).toBe(1);
    expect(sender.writableLength).toBe('m0;'.length * 10);
    await new Promise((r) => setImmediate(r));
    expect(sender.writableCorked).toBe(0);
    for (let i = 0; i < 100 && received().length < 30; i++) await new Promise((r) => setTimeout(r, 5));
    expect(received()).toBe(Array.from({ length: 10 }, (_, i) => `m${i};`).join(''));
  });

  it('corks again in a later turn', async () => {
    const { sender, received } = await pair();
    const hold = corkPerTurn(sender);
    hold();
    sender.write('a');
    await new Promise((r) => setImmediate(r));
    hold();
    sender.write('b');
    expect(sender.writableCorked).toBe(1);
    await new Promise((r) => setImmediate(r));
    expect(sender.writableCorked).toBe(0);
    for (let i = 0; i < 100 && received().length < 2; i++) await new Promise((r) => setTimeout(r, 5));
    expect(received()).toBe('ab');
  });
});
