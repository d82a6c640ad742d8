//! The control endpoints (`/_standin/…`) of the throttle proxy in front of moto
//! (`tests/tools/throttle_proxy.py`): what a test counts, holds and limits, per moto account so
//! that tests sharing the proxy stay apart.

use serde_json::Value;

/// The proxy at `url` (`BAKE_TEST_THROTTLE_ENDPOINT`).
pub struct ThrottleProxy<'a> {
    pub url: &'a str,
}

impl ThrottleProxy<'_> {
    /// `{"actions": {ACTION: {"passed", "throttled", "limited", "stalled"}}, "peak_copies": …}`
    /// for `account`.
    pub async fn stats(&self, account: &str) -> Value {
        let response = reqwest::get(format!("{}/_standin/stats?account={account}", self.url))
            .await
            .unwrap();
        assert!(response.status().is_success(), "{response:?}");
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()
    }

    /// How many `action` requests of `account` the proxy forwarded to moto.
    pub async fn passed(&self, account: &str, action: &str) -> u64 {
        self.stats(account).await["actions"][action]["passed"]
            .as_u64()
            .unwrap_or(0)
    }

    /// Holds the next `count` `action` requests of `account` forever (never forwarded, never
    /// answered).
    pub async fn stall(&self, account: &str, action: &str, count: u32) {
        self.post(
            &format!("stall?action={action}&count={count}&account={account}"),
            String::new(),
        )
        .await;
    }

    /// The limits for `account` from now on (the `--limits` document; its buckets start full).
    pub async fn set_limits(&self, account: &str, limits: &Value) {
        self.post(&format!("limits?account={account}"), limits.to_string())
            .await;
    }

    async fn post(&self, path: &str, body: String) {
        let response = reqwest::Client::new()
            .post(format!("{}/_standin/{path}", self.url))
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{path}: {response:?}");
    }
}
