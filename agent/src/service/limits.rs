//! Request admission for the API: a token bucket over every call on every listener, so
//! that one runaway client cannot keep the node's agent (and with it the API server's
//! own updates) busy. Calls beyond it get `RESOURCE_EXHAUSTED`, to be retried.
use std::{sync::Mutex, time::Instant};

use tonic::{Request, Status};

pub struct RateLimit {
    per_second: u32,
    bucket: Mutex<Bucket>,
}

struct Bucket {
    /// Calls that may go now; refilled at `per_second`, up to a second's worth.
    tokens: f64,
    at: Instant,
}

impl RateLimit {
    pub fn new(per_second: u32) -> RateLimit {
        RateLimit {
            per_second,
            bucket: Mutex::new(Bucket {
                tokens: f64::from(per_second),
                at: Instant::now(),
            }),
        }
    }

    /// Whether a call arriving at `now` may go (and takes its token if so).
    fn admit_at(&self, now: Instant) -> bool {
        let mut bucket = self
            .bucket
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let elapsed = now.saturating_duration_since(bucket.at);
        let rate = f64::from(self.per_second);
        bucket.tokens = (bucket.tokens + elapsed.as_secs_f64() * rate).min(rate);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// The interceptor's check of one call.
    pub fn check<T>(&self, request: Request<T>) -> Result<Request<T>, Status> {
        if self.admit_at(Instant::now()) {
            Ok(request)
        } else {
            Err(Status::resource_exhausted(format!(
                "more than {} API requests per second; retry later",
                self.per_second
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_seconds_worth_goes_at_once_then_the_rate() {
        let limit = RateLimit::new(10);
        let start = Instant::now();
        assert!((0..10).all(|_| limit.admit_at(start)), "the burst");
        assert!(!limit.admit_at(start), "beyond it");
        // A tenth of a second later, one more.
        let later = start + Duration::from_millis(100);
        assert!(limit.admit_at(later));
        assert!(!limit.admit_at(later));
        // A long pause refills no more than a second's worth.
        let much_later = later + Duration::from_secs(60);
        assert_eq!((0..20).filter(|_| limit.admit_at(much_later)).count(), 10);
    }

    #[test]
    fn a_refused_call_says_so_with_resource_exhausted() {
        let limit = RateLimit::new(1);
        assert!(limit.check(Request::new(())).is_ok());
        let refused = limit.check(Request::new(())).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused.message().contains("1 API requests per second"),
            "{refused:?}"
        );
    }
}
