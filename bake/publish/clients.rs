//! Per-region clients of the services publishing talks to, made from the one [`Aws`]
//! configuration (so they carry its endpoint, retries, emulator account and interceptors).

use aws_config::Region;

use crate::aws::Aws;

macro_rules! client {
    ($name:ident, $krate:ident) => {
        #[doc = concat!("A `", stringify!($krate), "` client for `region`.")]
        pub fn $name(aws: &Aws, region: &str) -> $krate::Client {
            let mut builder = $krate::config::Builder::from(aws.sdk_config())
                .region(Region::new(region.to_owned()));
            for interceptor in aws.interceptors() {
                builder = builder.interceptor(interceptor);
            }
            $krate::Client::from_conf(builder.build())
        }
    };
}

client!(ssm, aws_sdk_ssm);
client!(ecs, aws_sdk_ecs);
client!(ecr, aws_sdk_ecr);
client!(sts, aws_sdk_sts);
client!(autoscaling, aws_sdk_autoscaling);
