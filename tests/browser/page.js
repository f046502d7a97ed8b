// The js-libp2p side of tests/test_browser.py, bundled by drive.mjs with esbuild and run in
// Chromium. It does what a browser app does with a peer it has heard of: connect once,
// identify it, take the address the peer itself advertises for browsers (the forge form
// /dns4|dns6/<ip-label>.<peer>.libp2p.direct/tcp/<P>/tls/ws), dial that over real TLS and
// ping. libp2p's browser defaults stay on: its connection gater refuses private IPs and
// plain ws://, so only the forge name can work.
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { identify } from '@libp2p/identify'
import { ping } from '@libp2p/ping'
import { webSockets } from '@libp2p/websockets'
import { multiaddr } from '@multiformats/multiaddr'
import { createLibp2p } from 'libp2p'

function withoutPeer (addr) {
  return addr.toString().replace(/\/p2p\/[^/]+$/, '')
}

function forgeAddresses (addrs, peerB36, zone) {
  const escaped = `${peerB36}.${zone}`.replaceAll('.', '\\.')
  const form = new RegExp(`^/dns[46]/[0-9a-f-]+\\.${escaped}/tcp/\\d+/tls/ws$`)
  return addrs.map(withoutPeer).filter(a => form.test(a))
}

async function probe ({ bootstrap, peerId, peerB36, zone }) {
  const node = await createLibp2p({
    transports: [webSockets()],
    connectionEncrypters: [noise()],
    streamMuxers: [yamux()],
    services: { identify: identify(), ping: ping() }
  })
  try {
    // 1. Somewhere to start: the address the test hands out (a name under the peer's
    //    domain that the node does NOT advertise).
    const first = await node.dial(multiaddr(bootstrap))
    const told = await node.services.identify.identify(first)
    if (told.peerId.toString() !== peerId) throw new Error(`identified ${told.peerId}, wanted ${peerId}`)
    const listenAddrs = told.listenAddrs.map(a => a.toString())
    const recordAddrs = (told.signedPeerRecord?.addresses ?? []).map(a => a.toString())
    // js-libp2p prefers the signed record's addresses; the choice must be in both.
    const inRecord = new Set(forgeAddresses(told.signedPeerRecord?.addresses ?? [], peerB36, zone))
    const chosen = forgeAddresses(told.listenAddrs, peerB36, zone).find(a => inRecord.has(a))
    if (chosen == null) {
      return { ok: false, error: 'no forge address advertised', listenAddrs, recordAddrs }
    }
    await node.hangUp(first.remotePeer)

    // 2. A new connection to the advertised address, verified by the browser's TLS stack.
    const second = await node.dial(multiaddr(`${chosen}/p2p/${peerId}`))
    const remoteAddr = second.remoteAddr.toString()
    const rtt = await node.services.ping.ping(second.remoteAddr)
    const again = await node.services.identify.identify(second)
    return {
      ok: true,
      chosen,
      remoteAddr,
      rtt,
      listenAddrs,
      recordAddrs,
      recordSeq: told.signedPeerRecord?.seq?.toString(),
      listenAddrsOverForge: again.listenAddrs.map(a => a.toString()),
      agentVersion: told.agentVersion,
      connections: node.getConnections().length
    }
  } catch (err) {
    return { ok: false, error: `${err.name}: ${err.message}` }
  } finally {
    await node.stop()
  }
}

window.probe = probe
window.probeReady = true
