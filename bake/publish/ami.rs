//! The check before any pointer names an AMI: it exists in the region, is `available`, and every
//! account that will launch it (the publishing account and the recipe's sharing accounts) may.

use aws_sdk_ec2::types::{ImageAttributeName, ImageState};

use super::error::{PublishError, aws};

/// What the check needs to know about an AMI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmiFacts {
    pub state: String,
    pub owner: String,
    pub public: bool,
    /// Accounts with an explicit launch permission (known only to the owner).
    pub launch_accounts: Vec<String>,
}

/// The decision, without AWS: `Ok` or the first refusal.
pub fn judge(
    ami: &str,
    region: &str,
    facts: &AmiFacts,
    caller: &str,
    accounts: &[String],
) -> Result<(), PublishError> {
    if facts.state != ImageState::Available.as_str() {
        return Err(PublishError::AmiNotAvailable {
            ami: ami.to_owned(),
            region: region.to_owned(),
            state: facts.state.clone(),
        });
    }
    for account in accounts {
        let launchable = facts.public
            || facts.owner == *account
            || facts.launch_accounts.contains(account)
            // A caller that is not the owner can see the AMI only when it may launch it.
            || (account == caller && facts.owner != caller);
        if !launchable {
            return Err(PublishError::AmiNotShared {
                ami: ami.to_owned(),
                region: region.to_owned(),
                account: account.clone(),
            });
        }
    }
    Ok(())
}

/// Looks the AMI up in its region and judges it.
pub async fn check(
    ec2: &aws_sdk_ec2::Client,
    ami: &str,
    region: &str,
    caller: &str,
    accounts: &[String],
) -> Result<(), PublishError> {
    let described = ec2.describe_images().image_ids(ami).send().await;
    let images = match described {
        Ok(out) => out.images().to_vec(),
        Err(e)
            if e.as_service_error()
                .and_then(|s| aws_sdk_ec2::error::ProvideErrorMetadata::code(s))
                .is_some_and(|c| c.starts_with("InvalidAMIID")) =>
        {
            Vec::new()
        }
        Err(e) => return Err(aws("DescribeImages", region)(e)),
    };
    let Some(image) = images.into_iter().find(|i| i.image_id() == Some(ami)) else {
        return Err(PublishError::AmiMissing {
            ami: ami.to_owned(),
            region: region.to_owned(),
        });
    };
    let owner = image.owner_id().unwrap_or_default().to_owned();
    let mut facts = AmiFacts {
        state: image
            .state()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_else(|| "unknown".into()),
        public: image.public().unwrap_or(false),
        launch_accounts: Vec::new(),
        owner,
    };
    let needs_permissions = accounts.iter().any(|a| *a != facts.owner) && !facts.public;
    if needs_permissions && facts.owner == caller {
        let attribute = ec2
            .describe_image_attribute()
            .image_id(ami)
            .attribute(ImageAttributeName::LaunchPermission)
            .send()
            .await
            .map_err(aws("DescribeImageAttribute", region))?;
        for permission in attribute.launch_permissions() {
            if permission.group().is_some_and(|g| g.as_str() == "all") {
                facts.public = true;
            }
            if let Some(user) = permission.user_id() {
                facts.launch_accounts.push(user.to_owned());
            }
        }
    }
    judge(ami, region, &facts, caller, accounts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(state: &str, owner: &str) -> AmiFacts {
        AmiFacts {
            state: state.into(),
            owner: owner.into(),
            public: false,
            launch_accounts: vec![],
        }
    }

    #[test]
    fn only_available_amis_pass() {
        let me = "111111111111".to_owned();
        judge(
            "ami-1",
            "r",
            &facts("available", &me),
            &me,
            std::slice::from_ref(&me),
        )
        .unwrap();
        for state in ["pending", "failed", "deregistered"] {
            let err = judge(
                "ami-1",
                "r",
                &facts(state, &me),
                &me,
                std::slice::from_ref(&me),
            )
            .unwrap_err();
            assert!(err.to_string().contains(state), "{err}");
        }
    }

    #[test]
    fn every_account_must_be_able_to_launch() {
        let me = "111111111111".to_owned();
        let other = "222222222222".to_owned();
        let mut f = facts("available", &me);
        let err = judge("ami-1", "r", &f, &me, &[me.clone(), other.clone()]).unwrap_err();
        assert!(matches!(err, PublishError::AmiNotShared { ref account, .. } if *account == other));
        f.launch_accounts.push(other.clone());
        judge("ami-1", "r", &f, &me, &[me.clone(), other.clone()]).unwrap();
        let public = AmiFacts {
            public: true,
            ..facts("available", &me)
        };
        judge("ami-1", "r", &public, &me, std::slice::from_ref(&other)).unwrap();
        // Shared with the caller by someone else: the caller may launch it.
        judge(
            "ami-1",
            "r",
            &facts("available", &other),
            &me,
            std::slice::from_ref(&me),
        )
        .unwrap();
    }
}
