//! Group commit: concurrent callers that each need a small write committed share one transaction.
//!
//! Each caller queues its item and waits for its own result. A caller that finds no commit running takes
//! everything queued (up to a limit) and commits it in one go; callers arriving meanwhile queue for the next one.
//! With one caller at a time this is one commit per item, as before; under load one commit serves many (the
//! WAL flush, the cost that bounds per-message commits, is paid once). The commit runs on its own task, so a
//! caller that gives up waiting never cuts a commit in half: its item is committed or not as a whole, and the
//! others still get their results.

use std::future::Future;
use std::sync::Mutex;

use tokio::sync::oneshot;

type Waiting<T, R> = Vec<(T, oneshot::Sender<Result<R, String>>)>;

pub struct GroupCommit<T, R> {
    waiting: Mutex<Waiting<T, R>>,
    /// Held by the caller whose commit is running.
    running: tokio::sync::Mutex<()>,
    /// The most items in one commit.
    max: usize,
}

impl<T, R> GroupCommit<T, R>
where
    T: Send + 'static,
    R: Send + 'static,
{
    pub fn new(max: usize) -> Self {
        Self {
            waiting: Mutex::new(Vec::new()),
            running: tokio::sync::Mutex::new(()),
            max: max.max(1),
        }
    }

    /// Commits `item` with whatever else is queued, through `commit` (which returns one result per item, in
    /// order), and returns this item's result. An error of the commit is every item's error.
    pub async fn submit<F, Fut>(&self, item: T, commit: F) -> anyhow::Result<R>
    where
        F: Fn(Vec<T>) -> Fut,
        Fut: Future<Output = anyhow::Result<Vec<R>>> + Send + 'static,
    {
        let (reply, mut result) = oneshot::channel();
        self.lock_waiting().push((item, reply));
        loop {
            tokio::select! {
                biased;
                done = &mut result => {
                    return match done {
                        Ok(done) => done.map_err(anyhow::Error::msg),
                        Err(_) => Err(anyhow::anyhow!("the group commit ended without an answer")),
                    };
                }
                running = self.running.lock() => {
                    let batch: Waiting<T, R> = {
                        let mut waiting = self.lock_waiting();
                        let n = waiting.len().min(self.max);
                        waiting.drain(..n).collect()
                    };
                    // Empty: an earlier commit took this item and has answered; the next turn reads the answer.
                    if batch.is_empty() {
                        continue;
                    }
                    let (items, replies): (Vec<T>, Vec<_>) = batch.into_iter().unzip();
                    let work = commit(items);
                    let task = tokio::spawn(async move {
                        let expected = replies.len();
                        match work.await {
                            Ok(results) if results.len() == expected => {
                                for (reply, r) in replies.into_iter().zip(results) {
                                    let _ = reply.send(Ok(r));
                                }
                            }
                            Ok(results) => {
                                let e = format!("a group commit answered {} of {expected} items", results.len());
                                for reply in replies {
                                    let _ = reply.send(Err(e.clone()));
                                }
                            }
                            Err(e) => {
                                let e = format!("{e:#}");
                                for reply in replies {
                                    let _ = reply.send(Err(e.clone()));
                                }
                            }
                        }
                    });
                    let _ = task.await;
                    drop(running);
                }
            }
        }
    }

    fn lock_waiting(&self) -> std::sync::MutexGuard<'_, Waiting<T, R>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_callers_share_commits_and_each_gets_its_own_result() {
        let group = Arc::new(GroupCommit::<u32, u32>::new(100));
        let commits = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..50u32 {
            let group = group.clone();
            let commits = commits.clone();
            tasks.push(tokio::spawn(async move {
                group
                    .submit(i, move |items| {
                        commits.fetch_add(1, Ordering::SeqCst);
                        async move {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            Ok(items.iter().map(|x| x * 2).collect())
                        }
                    })
                    .await
            }));
        }
        for (i, task) in tasks.into_iter().enumerate() {
            assert_eq!(task.await.unwrap().unwrap(), i as u32 * 2);
        }
        let commits = commits.load(Ordering::SeqCst);
        assert!((1..50).contains(&commits), "{commits} commits for 50 concurrent items");
    }

    #[tokio::test]
    async fn a_failed_commit_is_the_error_of_each_of_its_items_and_a_limit_splits_batches() {
        let group = Arc::new(GroupCommit::<u32, u32>::new(2));
        let mut tasks = Vec::new();
        for i in 0..5u32 {
            let group = group.clone();
            tasks.push(tokio::spawn(async move {
                group
                    .submit(i, |items| async move {
                        assert!(items.len() <= 2, "{items:?}");
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        anyhow::bail!("database away")
                    })
                    .await
            }));
        }
        for task in tasks {
            let err = task.await.unwrap().unwrap_err();
            assert!(err.to_string().contains("database away"), "{err}");
        }
    }
}
