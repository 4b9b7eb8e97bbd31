//! Several servers serving the same model ([`Replicas`]): weights go to all of them at once,
//! sampling to one at a time; [`UpdateReport`] and [`VersionReport`] say how each one answered.

use super::{default_http, Client, ClientError};
use crate::protocol::{UpdateOptions, UpdateResponse, WeightInfo};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// What one replica answered.
#[derive(Debug)]
pub struct ReplicaResult<T> {
    /// The replica's base URL.
    pub url: String,
    /// Its answer.
    pub result: Result<T, ClientError>,
}

/// The outcome of pushing weights to every replica.
#[derive(Debug)]
pub struct UpdateReport {
    /// One entry per replica, in replica order.
    pub replicas: Vec<ReplicaResult<UpdateResponse>>,
}

impl UpdateReport {
    /// Whether every replica took the update.
    pub fn all_ok(&self) -> bool {
        self.replicas
            .iter()
            .all(|r| r.result.as_ref().is_ok_and(|u| u.success))
    }

    /// The version every replica serves now, if the update left them all on the same one.
    pub fn version(&self) -> Option<u64> {
        common(self.replicas.iter().map(|r| {
            r.result
                .as_ref()
                .ok()
                .filter(|u| u.success)
                .map(|u| u.weight_version)
        }))
    }

    /// The replicas that failed, with their errors.
    pub fn failures(&self) -> impl Iterator<Item = (&str, &ClientError)> {
        self.replicas
            .iter()
            .filter_map(|r| r.result.as_ref().err().map(|e| (r.url.as_str(), e)))
    }
}

/// Which replica serves which weights.
#[derive(Debug)]
pub struct VersionReport {
    /// Each replica's `/weight_info`, in replica order.
    pub replicas: Vec<ReplicaResult<WeightInfo>>,
}

impl VersionReport {
    /// Replica URLs by the weight version they serve; unreachable replicas are left out.
    pub fn by_version(&self) -> BTreeMap<u64, Vec<String>> {
        let mut out: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for r in &self.replicas {
            if let Ok(info) = &r.result {
                out.entry(info.weight_version)
                    .or_default()
                    .push(r.url.clone());
            }
        }
        out
    }

    /// The version all replicas serve, if every one answered with the same version and the same
    /// checksum (equal versions with different bits mean an update went wrong somewhere).
    pub fn consistent(&self) -> Option<u64> {
        let checksum = common(
            self.replicas
                .iter()
                .map(|r| r.result.as_ref().ok().map(|i| i.checksum.clone())),
        );
        checksum?;
        common(
            self.replicas
                .iter()
                .map(|r| r.result.as_ref().ok().map(|i| i.weight_version)),
        )
    }

    /// The replicas that did not answer, with their errors.
    pub fn unreachable(&self) -> impl Iterator<Item = (&str, &ClientError)> {
        self.replicas
            .iter()
            .filter_map(|r| r.result.as_ref().err().map(|e| (r.url.as_str(), e)))
    }
}

/// The value every item holds, if there is at least one item and none is missing or different.
fn common<T: PartialEq>(mut items: impl Iterator<Item = Option<T>>) -> Option<T> {
    let first = items.next()??;
    for x in items {
        if x.as_ref() != Some(&first) {
            return None;
        }
    }
    Some(first)
}

/// Several servers serving the same model: weights go to all, sampling to one at a time.
#[derive(Debug)]
pub struct Replicas {
    clients: Vec<Client>,
    next: AtomicUsize,
}

impl Replicas {
    /// Clients of the servers at `urls`, sharing one connection pool.
    pub fn new<I, S>(urls: I) -> Result<Replicas, ClientError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let http = default_http()?;
        let clients = urls
            .into_iter()
            .map(|u| Ok(Client::new(u.as_ref())?.with_http_client(http.clone())))
            .collect::<Result<Vec<_>, ClientError>>()?;
        Replicas::from_clients(clients)
    }

    /// Replicas over clients made elsewhere (each with its own keys).
    pub fn from_clients(clients: Vec<Client>) -> Result<Replicas, ClientError> {
        if clients.is_empty() {
            return Err(ClientError::NoReplicas);
        }
        Ok(Replicas {
            clients,
            next: AtomicUsize::new(0),
        })
    }

    /// The same replicas sending `key` on inference routes.
    pub fn with_api_key(mut self, key: &str) -> Replicas {
        self.clients = self
            .clients
            .into_iter()
            .map(|c| c.with_api_key(key))
            .collect();
        self
    }

    /// The same replicas sending `key` on trainer hooks.
    pub fn with_admin_key(mut self, key: &str) -> Replicas {
        self.clients = self
            .clients
            .into_iter()
            .map(|c| c.with_admin_key(key))
            .collect();
        self
    }

    /// Number of replicas (at least one).
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Always false: there is at least one replica.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// Every replica's client, in order.
    pub fn clients(&self) -> &[Client] {
        &self.clients
    }

    /// Replica `i`, counting round (`i` modulo the number of replicas).
    pub fn pick(&self, i: usize) -> &Client {
        &self.clients[i % self.clients.len()]
    }

    /// The next replica in round-robin order.
    pub fn next_client(&self) -> &Client {
        self.pick(self.next.fetch_add(1, Ordering::Relaxed))
    }

    /// Runs `f` on every replica at once; one result per replica, in order.
    pub async fn broadcast<'a, T, F, Fut>(&'a self, f: F) -> Vec<ReplicaResult<T>>
    where
        F: Fn(&'a Client) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let results = futures::future::join_all(self.clients.iter().map(&f)).await;
        self.clients
            .iter()
            .zip(results)
            .map(|(c, result)| ReplicaResult {
                url: c.base_url().to_string(),
                result,
            })
            .collect()
    }

    /// Uploads the same safetensors file to every replica at once (`POST /update_weights`).
    pub async fn update_weights(
        &self,
        safetensors: impl Into<Arc<Vec<u8>>>,
        opts: &UpdateOptions,
    ) -> UpdateReport {
        let data: Arc<Vec<u8>> = safetensors.into();
        let replicas = self
            .broadcast(|c| c.update_weights(data.clone(), opts))
            .await;
        UpdateReport { replicas }
    }

    /// Asks every replica which weights it serves (`GET /weight_info`).
    pub async fn versions(&self) -> VersionReport {
        VersionReport {
            replicas: self.broadcast(Client::weight_info).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_pick_round_robin() {
        let r = Replicas::new(["http://a:1", "http://b:2"]).unwrap();
        assert_eq!(r.pick(3).base_url(), "http://b:2");
        let order: Vec<&str> = (0..3).map(|_| r.next_client().base_url()).collect();
        assert_eq!(order, ["http://a:1", "http://b:2", "http://a:1"]);
        assert!(matches!(
            Replicas::new(Vec::<String>::new()),
            Err(ClientError::NoReplicas)
        ));
    }

    fn info(version: u64, checksum: &str) -> WeightInfo {
        WeightInfo {
            weight_version: version,
            dtype: "float16".into(),
            num_tensors: 1,
            num_bytes: 2,
            checksum: checksum.into(),
            tensors: vec![],
            extra: Default::default(),
        }
    }

    fn replica<T>(url: &str, result: Result<T, ClientError>) -> ReplicaResult<T> {
        ReplicaResult {
            url: url.into(),
            result,
        }
    }

    #[test]
    fn version_report_groups_replicas_and_checks_consistency() {
        let same = VersionReport {
            replicas: vec![
                replica("a", Ok(info(3, "x"))),
                replica("b", Ok(info(3, "x"))),
            ],
        };
        assert_eq!(same.consistent(), Some(3));
        let split = VersionReport {
            replicas: vec![
                replica("a", Ok(info(3, "x"))),
                replica("b", Ok(info(4, "y"))),
                replica("c", Err(ClientError::NoReplicas)),
            ],
        };
        assert_eq!(split.consistent(), None);
        let by = split.by_version();
        assert_eq!(by[&3], ["a"]);
        assert_eq!(by[&4], ["b"]);
        assert_eq!(split.unreachable().count(), 1);
        let bits_differ = VersionReport {
            replicas: vec![
                replica("a", Ok(info(3, "x"))),
                replica("b", Ok(info(3, "z"))),
            ],
        };
        assert_eq!(bits_differ.consistent(), None);
    }
}
