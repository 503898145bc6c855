//! Plans and their limits. The defaults are the product page's table; a TOML plans file
//! (`SENDABLE_KEYS_PLANS_FILE`) can override any of them. Sessions may also carry custom values,
//! which win over the plan's. The table is consulted on every request (it is passed to the store
//! with each call), so a plan change or a new plans file applies to the very next request.

use std::fmt;

use serde::Deserialize;

/// Highest per-key limit accepted anywhere (plans file or custom value): keeps the
/// sliding-window arithmetic (count x window length) far inside exact f64/i64 range.
pub const MAX_RATE_LIMIT_PER_MINUTE: u32 = 100_000_000;
/// Highest key limit accepted; 0 means unlimited.
pub const MAX_KEYS_LIMIT: u32 = 1_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Plan {
    Free = 1,
    Starter = 2,
    Pro = 3,
    Enterprise = 4,
}

impl Plan {
    pub const ALL: [Plan; 4] = [Plan::Free, Plan::Starter, Plan::Pro, Plan::Enterprise];

    pub fn name(self) -> &'static str {
        match self {
            Plan::Free => "free",
            Plan::Starter => "starter",
            Plan::Pro => "pro",
            Plan::Enterprise => "enterprise",
        }
    }

    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: i64) -> Option<Self> {
        Plan::ALL.into_iter().find(|p| i64::from(p.code()) == code)
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One plan's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanLimits {
    /// Active keys per session; 0 = unlimited.
    pub max_keys: u32,
    /// Requests per minute per key; `None` = no default, sessions must set a custom value.
    pub rate_limit_per_minute: Option<u32>,
}

/// The limits of every plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanTable {
    limits: [PlanLimits; 4],
}

impl Default for PlanTable {
    /// The product page: Free 3 / 60, Starter 10 / 300, Pro unlimited / 1000, Enterprise
    /// unlimited / custom.
    fn default() -> Self {
        PlanTable {
            limits: [
                PlanLimits {
                    max_keys: 3,
                    rate_limit_per_minute: Some(60),
                },
                PlanLimits {
                    max_keys: 10,
                    rate_limit_per_minute: Some(300),
                },
                PlanLimits {
                    max_keys: 0,
                    rate_limit_per_minute: Some(1000),
                },
                PlanLimits {
                    max_keys: 0,
                    rate_limit_per_minute: None,
                },
            ],
        }
    }
}

/// The limits that apply to one session: custom values over plan defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EffectiveLimits {
    pub rate_limit_per_minute: u32,
    /// 0 = unlimited.
    pub max_keys: u32,
}

impl PlanTable {
    pub fn limits(&self, plan: Plan) -> PlanLimits {
        self.limits[usize::from(plan.code() - 1)]
    }

    /// The session's limits, or `None` when no rate limit applies (an Enterprise session
    /// without a custom value while the table gives Enterprise no default).
    pub fn effective(
        &self,
        plan: Plan,
        custom_rate_limit: Option<u32>,
        custom_max_keys: Option<u32>,
    ) -> Option<EffectiveLimits> {
        let defaults = self.limits(plan);
        Some(EffectiveLimits {
            rate_limit_per_minute: custom_rate_limit.or(defaults.rate_limit_per_minute)?,
            max_keys: custom_max_keys.unwrap_or(defaults.max_keys),
        })
    }

    /// Per-plan default rate limits in plan-code order, 0 where the plan has none: the form the
    /// stores take it in.
    pub fn rate_limits(&self) -> [u32; 4] {
        self.limits.map(|l| l.rate_limit_per_minute.unwrap_or(0))
    }

    /// Per-plan key limits in plan-code order (0 = unlimited).
    pub fn max_keys(&self) -> [u32; 4] {
        self.limits.map(|l| l.max_keys)
    }

    /// Reads a plans file: optional `[free]`, `[starter]`, `[pro]`, `[enterprise]` tables with
    /// optional `max_keys` and `rate_limit_per_minute`; anything omitted keeps its default.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Override {
            max_keys: Option<u32>,
            rate_limit_per_minute: Option<u32>,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            free: Option<Override>,
            starter: Option<Override>,
            pro: Option<Override>,
            enterprise: Option<Override>,
        }
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut table = PlanTable::default();
        for (plan, over) in [
            (Plan::Free, file.free),
            (Plan::Starter, file.starter),
            (Plan::Pro, file.pro),
            (Plan::Enterprise, file.enterprise),
        ] {
            let Some(over) = over else { continue };
            let slot = &mut table.limits[usize::from(plan.code() - 1)];
            if let Some(max_keys) = over.max_keys {
                if max_keys > MAX_KEYS_LIMIT {
                    return Err(format!(
                        "[{plan}] max_keys must be at most {MAX_KEYS_LIMIT} (0 = unlimited)"
                    ));
                }
                slot.max_keys = max_keys;
            }
            if let Some(rate) = over.rate_limit_per_minute {
                if rate == 0 || rate > MAX_RATE_LIMIT_PER_MINUTE {
                    return Err(format!(
                        "[{plan}] rate_limit_per_minute must be between 1 and {MAX_RATE_LIMIT_PER_MINUTE}"
                    ));
                }
                slot.rate_limit_per_minute = Some(rate);
            }
        }
        Ok(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_product_page_table() {
        let t = PlanTable::default();
        assert_eq!(
            t.effective(Plan::Free, None, None)
                .map(|e| (e.max_keys, e.rate_limit_per_minute)),
            Some((3, 60))
        );
        assert_eq!(
            t.effective(Plan::Starter, None, None)
                .map(|e| (e.max_keys, e.rate_limit_per_minute)),
            Some((10, 300))
        );
        assert_eq!(
            t.effective(Plan::Pro, None, None)
                .map(|e| (e.max_keys, e.rate_limit_per_minute)),
            Some((0, 1000))
        );
        assert_eq!(t.effective(Plan::Enterprise, None, None), None);
        assert_eq!(
            t.effective(Plan::Enterprise, Some(5000), None),
            Some(EffectiveLimits {
                rate_limit_per_minute: 5000,
                max_keys: 0
            })
        );
        assert_eq!(
            t.effective(Plan::Free, Some(5), Some(1))
                .map(|e| (e.max_keys, e.rate_limit_per_minute)),
            Some((1, 5))
        );
    }

    #[test]
    fn plans_file_overrides_only_what_it_names() {
        let t = PlanTable::from_toml("[free]\nrate_limit_per_minute = 120\n[enterprise]\nrate_limit_per_minute = 10000\nmax_keys = 50\n")
            .expect("valid file");
        assert_eq!(
            t.limits(Plan::Free),
            PlanLimits {
                max_keys: 3,
                rate_limit_per_minute: Some(120)
            }
        );
        assert_eq!(
            t.limits(Plan::Starter),
            PlanTable::default().limits(Plan::Starter)
        );
        assert_eq!(
            t.limits(Plan::Enterprise),
            PlanLimits {
                max_keys: 50,
                rate_limit_per_minute: Some(10000)
            }
        );
    }

    #[test]
    fn bad_plans_files_are_refused_with_a_reason() {
        for (text, needle) in [
            ("[free]\nrate_limit_per_minute = 0\n", "between 1"),
            ("[free]\nmax_keys = 99999999\n", "at most"),
            ("[gold]\nmax_keys = 1\n", "gold"),
            ("[free]\nrate_limit = 5\n", "rate_limit"),
            ("[free\n", ""),
        ] {
            let err = PlanTable::from_toml(text).expect_err(text);
            assert!(err.contains(needle), "{err}");
        }
    }
}
