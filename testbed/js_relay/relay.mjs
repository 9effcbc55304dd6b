// A circuit relay v2 server from another libp2p implementation (js-libp2p), for interop tests.
// Usage: node relay.mjs <listen multiaddr>; prints "relay <multiaddr>/p2p/<id>" per address once listening.
// Node 20 (what our machines have) lacks Promise.withResolvers, which js-libp2p 3 uses: add it before loading it
Promise.withResolvers ??= function () {
  let resolve, reject
  const promise = new Promise((res, rej) => { resolve = res; reject = rej })
  return { promise, resolve, reject }
}
const { createLibp2p } = await import('libp2p')
const { tcp } = await import('@libp2p/tcp')
const { noise } = await import('@chainsafe/libp2p-noise')
const { yamux } = await import('@chainsafe/libp2p-yamux')
const { identify } = await import('@libp2p/identify')
const { circuitRelayServer } = await import('@libp2p/circuit-relay-v2')

const node = await createLibp2p({
  addresses: { listen: [process.argv[2] ?? '/ip4/127.0.0.1/tcp/0'] },
  transports: [tcp()],
  connectionEncrypters: [noise()],
  streamMuxers: [yamux()],
  services: {
    identify: identify(),
    relay: circuitRelayServer({ reservations: { maxReservations: 32, applyDefaultLimit: false } })
  }
})
await node.start()
for (const ma of node.getMultiaddrs()) console.log(`relay ${ma.toString()}`)
process.on('SIGTERM', async () => { await node.stop(); process.exit(0) })
