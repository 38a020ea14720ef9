use std::{
    marker::PhantomData,
    sync::{Arc, Mutex},
    vec,
};

use burn_communication::{CommunicationChannel, Message, Protocol, ProtocolClient};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, RwLock};

use crate::{NodeId, global::shared::GlobalCollectiveError, node::base::NodeState};

/// Handles the status of sync requests from other nodes
pub(crate) struct SyncService<P: Protocol> {
    /// Current node's state, shared with the thread that does aggregations
    node_state: Arc<RwLock<Option<NodeState>>>,
    /// The number of peers that have requested to sync with us since the last successful sync.
    syncing_peers: Mutex<Vec<NodeId>>,
    /// Notification on each incoming sync request
    sync_notif: Notify,

    _p: PhantomData<P>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SyncRequest(NodeId);

impl<P: Protocol> SyncService<P> {
    pub fn new(node_state: Arc<RwLock<Option<NodeState>>>) -> Self {
        Self {
            node_state,
            syncing_peers: Mutex::new(vec![]),
            sync_notif: Notify::new(),
            _p: PhantomData,
        }
    }

    fn add_syncing_peer(&self, peer: NodeId) {
        let mut syncing_peers = self.syncing_peers.lock().unwrap();
        syncing_peers.push(peer);
    }

    /// Sync with all peers.
    pub async fn sync(&self) -> Result<(), GlobalCollectiveError> {
        // we can't sync while we register
        let node_state = self.node_state.read().await;
        let node_state = node_state
            .as_ref()
            .expect("Trying to sync a node before having registered to the orchestrator");

        // this peer is syncing
        self.add_syncing_peer(node_state.node_id);
        for (id, addr) in &node_state.nodes {
            if *id == node_state.node_id {
                continue;
            }

            // kiln patch: a peer that cannot be reached is an error for the caller (upstream
            // panicked on the runtime's thread, and the caller saw only `LocalServerMissing`).
            let Some(mut connection) = P::Client::connect(addr.clone(), "sync").await else {
                return Err(GlobalCollectiveError::PeerLost(*id));
            };
            let msg = SyncRequest(node_state.node_id);
            let sync_bytes = rmp_serde::to_vec(&msg).unwrap();
            if connection.send(Message::new(sync_bytes.into())).await.is_err() {
                return Err(GlobalCollectiveError::PeerLost(*id));
            }
        }
        let mut all_node_ids = node_state.nodes.keys().cloned().collect::<Vec<_>>();
        all_node_ids.sort();
        loop {
            // kiln patch: registered before the check, so a request that lands between the check
            // and the wait is not lost (`notify_waiters` keeps no permit).
            let notified = self.sync_notif.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                // compare currently synced peers with list of all nodes
                let mut shared = self.syncing_peers.lock().unwrap();
                let mut syncing_peers = shared.to_vec();
                syncing_peers.sort();

                if syncing_peers == all_node_ids {
                    // kiln patch: all nodes have synced; the shared list is cleared (upstream
                    // cleared a copy, so the second sync never completed).
                    shared.clear();
                    return Ok(());
                }
            }
            // Wait for the next sync to come in
            notified.await
        }
    }

    pub async fn handle_sync_connection<C: CommunicationChannel>(&self, mut channel: C) {
        // kiln patch: a peer lost mid-request ends the connection (upstream panicked).
        let Ok(Some(msg)) = channel.recv().await else {
            return;
        };

        let Ok(msg) = rmp_serde::from_slice::<SyncRequest>(&msg.data) else {
            return;
        };

        self.add_syncing_peer(msg.0);

        self.sync_notif.notify_waiters();
    }
}
